"""Where the data live: the datasets folder, the dataset cache and the reports folder.

Precedence: explicit argument (CLI flag) > environment variable > default.

| what            | env var       | default                                                          |
|-----------------|---------------|------------------------------------------------------------------|
| datasets folder | `DATA_DIR`    | `data/raw` if present, else `../shared/data/ann-numpy-array-images` |
| dataset cache   | `CACHE_DIR`   | `data/cache`                                                     |
| reports         | `REPORTS_DIR` | `reports/`                                                       |

The tracking store and the study storage are resolved beside these, in
`experiments.core.config`, which re-exports this module's functions.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "ann-numpy-array-images"


def env_path(name: str) -> Path | None:
    """The absolute path in environment variable `name`, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else None


def data_dir(override: str | Path | None = None) -> Path:
    """The folder holding TRAIN/, TEST/ and TEST2/ (read-only input)."""
    if override:
        return Path(override).expanduser().resolve()
    env = env_path("DATA_DIR")
    if env:
        return env
    local = PROJECT_ROOT / "data" / "raw"
    return local if local.is_dir() else SHARED_DATA.resolve()


def cache_dir() -> Path:
    return env_path("CACHE_DIR") or PROJECT_ROOT / "data" / "cache"


def reports_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    return env_path("REPORTS_DIR") or PROJECT_ROOT / "reports"
