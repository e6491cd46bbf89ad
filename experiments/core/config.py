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

from sqlalchemy.engine import make_url

from data_tools.fetch import mask_query
from data_tools.paths import PROJECT_ROOT, cache_dir, data_dir, env_path, reports_dir

__all__ = [
    "PROJECT_ROOT",
    "artifacts_dir",
    "cache_dir",
    "check_store_path",
    "check_tracking_uri",
    "data_dir",
    "mask_secrets",
    "mlruns_dir",
    "reports_dir",
    "resume_dir",
    "store_dir",
    "study_storage",
    "tracking_uri",
]


def mlruns_dir() -> Path:
    return env_path("MLRUNS_DIR") or PROJECT_ROOT / "mlruns"


def resume_dir() -> Path:
    """Where long runs keep their state between epochs (experiments/training/resume.py)."""
    return env_path("RESUME_DIR") or cache_dir() / "resume"


def store_dir() -> Path:
    """The folder of the local tracking store: the folder of an explicit `sqlite:///` database
    (`MLFLOW_TRACKING_URI`), else the store folder (`MLRUNS_DIR`)."""
    database = sqlite_database(tracking_uri())
    return database.parent if database is not None else mlruns_dir()


def artifacts_dir() -> Path:
    """Where new experiments keep their artifacts: `artifacts/` beside the tracking database."""
    return store_dir() / "artifacts"


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (its query string dropped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


# characters a file path cannot hold inside a `sqlite:///` URI: `?` starts its query, `#` a
# fragment, and SQLAlchemy decodes `%xx`, so the database would be opened at another path
URI_UNSAFE = "?#%"


def check_store_path() -> None:
    """One line (ValueError) when the store folder cannot be written as a SQLite URI."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip() not in ("", default_tracking_uri()):
        return  # an explicit tracking URI: the store folder holds no database
    folder = str(mlruns_dir())
    unsafe = sorted({char for char in folder if char in URI_UNSAFE})
    if unsafe:
        raise ValueError(
            f"MLRUNS_DIR={folder}: a store folder whose path holds {' or '.join(map(repr, unsafe))} "
            "cannot be opened as a SQLite database URI; use a folder without '?', '#' and '%'"
        )


# the tracking stores the project runs on (MLflow accepts others that the project does not)
SUPPORTED_TRACKING = ("sqlite:///", "postgresql://", "postgresql+", "http://", "https://")


def check_tracking_uri(uri: str) -> None:
    """One line (ValueError) for a tracking URI the project cannot use: another scheme (a plain
    path, `file:`, `mysql:`, `databricks:`), a relative SQLite path, or credentials holding a
    raw `@` (parsers split them at different `@`s and print part of the password)."""
    shown = mask_url(uri)
    supported = (
        "sqlite:////<absolute path>/mlflow.db, postgresql://<user>:<password>@<host>/<database> "
        "or http(s)://<tracking server>; unset it to use the store folder (MLRUNS_DIR)"
    )
    if not uri.startswith(SUPPORTED_TRACKING):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={shown}: not a supported tracking store; use {supported}"
        )
    database = sqlite_database(uri)
    if database is not None and not database.is_absolute():
        raise ValueError(
            f"MLFLOW_TRACKING_URI={shown}: the database path must be absolute (four slashes: "
            "sqlite:////<absolute path>/mlflow.db)"
        )
    if "@" in credentials(uri):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={shown}: the password holds a raw '@'; percent-encode it as %40"
        )


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


def credentials(url: str) -> str:
    """Everything between `scheme://` and the last `@` of `url` (empty without an `@`): the
    user and password however a parser would split them, a raw `@` in the password included."""
    return url.partition("://")[2].rpartition("@")[0]


def mask_url(url: str) -> str:
    """`url` with its password and password-like query parameters replaced by `***`.

    SQLAlchemy's URL parser decides whether there is a password; the credentials
    are taken to end at the last `@`, so a raw `@` inside a password is hidden too.
    A password holding a raw `@` is ambiguous to every parser: all that lies between
    `scheme://` and the last `@` is masked but the user name.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    try:
        parsed = make_url(url)
        has_password = parsed.password is not None
    except Exception:  # not a URL SQLAlchemy knows (http://...): judge by its shape
        has_password = ":" in rest.rpartition("@")[0]
    if "@" in rest.rpartition("@")[0]:  # ambiguous: the user name is what precedes the first ':'
        has_password = True
    if "@" in rest:
        secret, _, rest = rest.rpartition("@")
        user = re.split("[:@]", secret, maxsplit=1)[0]
        rest = f"{user}{':***' if user != secret or has_password else ''}@{rest}"
    return f"{scheme}://{mask_query(rest, SECRET_KEYS)}"


def mask_secrets(text: str) -> str:
    """`text` with every URL in it masked (`mask_url`): for tags, params, logs and printed lines."""

    def masked(match: re.Match) -> str:
        url = match.group(0)
        core = url.rstrip(":,;.)'\"")  # punctuation that ends a sentence, not the URL
        return mask_url(core) + url[len(core) :]

    text = _URL.sub(masked, text)
    for piece in _configured_secrets():
        text = text.replace(piece, "***@" if piece.endswith("@") else "***")
    return text


SECRET_URL_VARIABLES = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "GLYPH_DATA_SOURCE")


def _configured_secrets() -> list[str]:
    """Pieces of the passwords of the URLs in the environment that a parser may print outside
    any URL: the password itself (raw and decoded) and, for a password holding a raw `@`, each
    tail after an `@` that a parser takes for the start of the host (`ss@host`)."""
    from urllib.parse import unquote

    pieces = set()
    for name in SECRET_URL_VARIABLES:
        secret = credentials(os.environ.get(name, "").strip())
        user = re.split("[:@]", secret, maxsplit=1)[0]
        password = secret[len(user) + 1 :]
        if not password:
            continue
        pieces.update(p for p in (password, unquote(password)) if len(p) >= 4)
        parts = secret.split("@")
        pieces.update("@".join(parts[i:]) + "@" for i in range(1, len(parts)))
    return sorted(pieces, key=len, reverse=True)
