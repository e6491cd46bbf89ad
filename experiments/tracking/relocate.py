"""A local store opened at a new path (copied with `cp -a`, moved, mounted elsewhere).

MLflow keeps absolute artifact locations: each experiment's, each run's and each logged
model's. A store opened at a new path would still read and write artifacts at the old one,
so every command refuses such a store in one line (`check_located`), and
`python -m experiments relocate` rewrites the locations to the store's new path, in one
SQLite transaction under the store's lock.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlsplit

# (table, column) holding absolute artifact locations in MLflow 3's SQLite schema
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


DEFAULT_EXPERIMENT = "0"  # MLflow's own, created with every store


def local_path(location: str) -> Path | None:
    """The local path of an artifact location (`file://...` or a plain absolute path), or None
    for a remote one (s3://, a tracking server's mlflow-artifacts:/, ...)."""
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


# a write of a live process holds the database for milliseconds; one held this long is stuck
LOCK_WAIT = 10.0


def _connect(database: Path, write: bool = False) -> sqlite3.Connection:
    mode = "rw" if write else "ro"
    return sqlite3.connect(f"file:{database.as_posix()}?mode={mode}", uri=True, timeout=LOCK_WAIT)


def foreign_experiments(database: Path, root: Path) -> list[tuple[str, str, str]]:
    """(experiment id, name, location) of every experiment whose local artifact location lies
    outside `root` (the store's folder). MLflow's Default experiment is not judged: its
    location comes from the working directory that created the store, and no run uses it
    (relocate moves it with the others when it lay in the old folder)."""
    with contextlib.closing(_connect(database)) as connection:
        rows = connection.execute(
            "SELECT experiment_id, name, artifact_location FROM experiments"
        ).fetchall()
    root = root.resolve()
    foreign = []
    for experiment_id, name, location in rows:
        if str(experiment_id) == DEFAULT_EXPERIMENT:
            continue
        path = local_path(location or "")
        if path is not None and not path.resolve().is_relative_to(root):
            foreign.append((str(experiment_id), name, location))
    return foreign


def check_located(database: Path, root: Path) -> None:
    """One line (RuntimeError) when the store at `root` holds experiments whose artifacts lie
    outside it: it was copied or moved."""
    if not database.exists():
        return
    try:
        foreign = foreign_experiments(database, root)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # held for LOCK_WAIT s: the CLI says so in one line
            raise
        return  # not readable as SQLite here: MLflow's own open reports it
    except sqlite3.DatabaseError:
        return
    if foreign:
        _, name, location = foreign[0]
        raise RuntimeError(
            f"store {root} was copied or moved: experiment {name!r} (and {len(foreign) - 1} "
            f"more) keeps its artifacts at {location}, outside it; run `python -m experiments "
            f"relocate` to point them into {root}, or set MLRUNS_DIR back to the original"
        )


def old_root(experiment_id: str, name: str, location: str) -> Path:
    """The store folder an experiment's artifact location was made under: `<root>/artifacts/
    <name>`, as `store.experiment_id` creates them."""
    path = local_path(location)
    if path is not None and path.name == name and path.parent.name == "artifacts":
        return path.parent.parent
    raise ValueError(
        f"relocate: experiment {name!r} keeps its artifacts at {location}, which is not of "
        "this project's layout (<store>/artifacts/<experiment>); relocate it by hand"
    )


def relocate(root: Path) -> dict[str, int]:
    """Rewrite every artifact location under an old store folder to `root`; returns the rows
    changed per table (empty when nothing lies outside `root`)."""
    from filelock import FileLock

    root = root.resolve()
    database = root / "mlflow.db"
    if not database.exists():
        raise ValueError(f"relocate: {database}: no store there (set MLRUNS_DIR to the copy)")
    moves = {old_root(*row): root for row in foreign_experiments(database, root)}
    if not moves:
        return {}
    try:
        with FileLock(f"{database}.lock"):
            return _rewrite(database, root)
    except (OSError, sqlite3.OperationalError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if isinstance(exc, OSError) and exc.errno not in READ_ONLY_ERRORS:
            raise
        if isinstance(exc, sqlite3.OperationalError) and "readonly" not in reason.replace("-", ""):
            raise
        raise ValueError(
            f"relocate: {database}: the store is read-only here ({reason}), so its artifact "
            "locations cannot be rewritten; copy the store folder to a writable place and "
            "relocate the copy, or open it at its original path"
        ) from None


READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _rewrite(database: Path, root: Path) -> dict[str, int]:
    """`relocate`'s rewrite, in one transaction (the caller holds the store's lock)."""
    moves = {old_root(*row): root for row in foreign_experiments(database, root)}
    if not moves:
        return {}
    changed: dict[str, int] = {}
    with contextlib.closing(_connect(database, write=True)) as connection, connection:
        tables = {
            r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        for old, new in moves.items():
            for prefix, replacement in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                for table, column in LOCATION_COLUMNS:
                    if table not in tables:
                        continue
                    count = _replace_prefix(connection, table, column, prefix, replacement)
                    changed[table] = changed.get(table, 0) + count
    return {table: n for table, n in changed.items() if n}


def _replace_prefix(connection, table: str, column: str, prefix: str, replacement: str) -> int:
    """`prefix` -> `replacement` at the start of `column`, on a path boundary only."""
    cursor = connection.execute(
        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (fixed names)
        f"WHERE substr({column}, 1, ?) = ? AND "
        f"(length({column}) = ? OR substr({column}, ?, 1) = '/')",
        (replacement, len(prefix) + 1, len(prefix), prefix, len(prefix), len(prefix) + 1),
    )
    return cursor.rowcount
