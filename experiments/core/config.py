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
from urllib.parse import parse_qsl, urlencode

from sqlalchemy.engine import make_url

from data_tools.paths import PROJECT_ROOT, cache_dir, data_dir, env_path, reports_dir

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
    return env or default_tracking_uri()


def default_tracking_uri() -> str:
    """The project's own store: `mlflow.db` in the store folder (MLRUNS_DIR)."""
    return f"sqlite:///{(mlruns_dir() / 'mlflow.db').as_posix()}"


def study_storage(override: str | None = None) -> str:
    """Optuna storage: a URL (RDB) or the default journal file path."""
    if override:
        return override
    env = os.environ.get("OPTUNA_STORAGE", "").strip()
    return env or str(mlruns_dir() / "optuna.journal")


SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "auth")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")  # finds URL tokens in free text; each is parsed


def mask_url(url: str) -> str:
    """`url` with its password and password-like query parameters replaced by `***`.

    SQLAlchemy's URL parser decides whether there is a password; the credentials
    are taken to end at the last `@`, so a raw `@` inside a password is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    try:
        parsed = make_url(url)
        has_password = parsed.password is not None
    except Exception:  # not a URL SQLAlchemy knows (http://...): judge by its shape
        has_password = ":" in rest.rpartition("@")[0]
    if "@" in rest:
        credentials, _, rest = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        rest = f"{user}{':***' if colon or has_password else ''}@{rest}"
    location, question, query = rest.partition("?")
    if question:
        pairs = [
            (key, "***" if any(word in key.lower() for word in SECRET_KEYS) else value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    return f"{scheme}://{location}{question}{query}"


def mask_secrets(text: str) -> str:
    """`text` with every URL in it masked (`mask_url`): for tags, params, logs and printed lines."""

    def masked(match: re.Match) -> str:
        url = match.group(0)
        core = url.rstrip(":,;.)'\"")  # punctuation that ends a sentence, not the URL
        return mask_url(core) + url[len(core) :]

    return _URL.sub(masked, text)
