"""Every path and store location of the project, resolved in one place.

Precedence: explicit argument (CLI flag) > environment variable > default.

| what                 | env var               | default                                                |
|----------------------|-----------------------|--------------------------------------------------------|
| datasets folder      | `DATA_DIR`            | `data/raw` if present, else `../shared/data/ann-numpy-array-images` |
| dataset cache        | `CACHE_DIR`           | `data/cache`                                           |
| reports              | `REPORTS_DIR`         | `reports/`                                             |
| tracking store       | `MLRUNS_DIR`          | `mlruns/` (SQLite `mlflow.db`, artifacts in `artifacts/`) |
| tracking database    | `MLFLOW_TRACKING_URI` | `sqlite:////<abs MLRUNS_DIR>/mlflow.db`                |
| Optuna storage       | `OPTUNA_STORAGE`      | journal file `<MLRUNS_DIR>/optuna.journal`             |

The data paths are `data_tools.paths` (the data layer knows nothing of the
study layer), re-exported here so that experiments read every location from
this module. Nothing here imports torch or mlflow, so it is cheap to import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from data_tools.paths import PROJECT_ROOT, cache_dir, data_dir, env_path, reports_dir

NUM_CLASSES = 6
__all__ = [
    "PROJECT_ROOT",
    "artifacts_dir",
    "cache_dir",
    "data_dir",
    "mask_secrets",
    "mlruns_dir",
    "reports_dir",
    "study_storage",
    "tracking_uri",
]


def mlruns_dir() -> Path:
    return env_path("MLRUNS_DIR") or PROJECT_ROOT / "mlruns"


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
