"""Every path and store location of the project, resolved in one place.

Precedence: explicit argument (CLI flag) > environment variable > default.

| what                 | env var               | default                                                |
|----------------------|-----------------------|--------------------------------------------------------|
| datasets folder      | `DATA_DIR`            | `data/raw` if present, else `../shared/data/ann-numpy-array-images` |
| dataset cache        | `CACHE_DIR`           | `data/cache`                                           |
| tracking store       | `MLRUNS_DIR`          | `mlruns/` (SQLite `mlflow.db`, artifacts in `artifacts/`) |
| tracking database    | `MLFLOW_TRACKING_URI` | `sqlite:////<abs MLRUNS_DIR>/mlflow.db`                |
| Optuna storage       | `OPTUNA_STORAGE`      | journal file `<MLRUNS_DIR>/optuna.journal`             |
| reports              | `REPORTS_DIR`         | `reports/`                                             |

Nothing here imports torch or mlflow, so it is cheap to import anywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "ann-numpy-array-images"
NUM_CLASSES = 6


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else None


def data_dir(override: str | Path | None = None) -> Path:
    """The folder holding TRAIN/, TEST/ and TEST2/ (read-only input)."""
    if override:
        return Path(override).expanduser().resolve()
    env = _env_path("DATA_DIR")
    if env:
        return env
    local = PROJECT_ROOT / "data" / "raw"
    return local if local.is_dir() else SHARED_DATA.resolve()


def cache_dir() -> Path:
    return _env_path("CACHE_DIR") or PROJECT_ROOT / "data" / "cache"


def mlruns_dir() -> Path:
    return _env_path("MLRUNS_DIR") or PROJECT_ROOT / "mlruns"


def reports_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    return _env_path("REPORTS_DIR") or PROJECT_ROOT / "reports"


def artifacts_dir() -> Path:
    return mlruns_dir() / "artifacts"


def tracking_uri() -> str:
    """The MLflow tracking URI: a SQLite file with an absolute path, unless overridden."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(mlruns_dir() / 'mlflow.db').as_posix()}"


def study_storage(override: str | None = None) -> str:
    """Optuna storage: a URL (RDB) or the default journal file path."""
    if override:
        return override
    env = os.environ.get("OPTUNA_STORAGE", "").strip()
    return env or str(mlruns_dir() / "optuna.journal")


_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)(?P<pw>[^@\s]+)(?P<tail>@)")


def mask_secrets(text: str) -> str:
    """Hide the password of any URL in `text` (`scheme://user:***@host`)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)
