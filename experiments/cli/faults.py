"""Signals and store faults as one line: SIGTERM ends runs as Ctrl-C does; a damaged or locked
tracking store names its database instead of a traceback."""

from __future__ import annotations

import logging
import os
import signal


def install_handlers() -> None:
    """SIGTERM as Ctrl-C (a `kill`, a scheduler, make stopping its jobs: runs end KILLED and
    tagged interrupted, never left RUNNING; the exit status is 143), and MLflow's logged
    database tracebacks dropped (GLYPH_TRACEBACK=1 keeps them): `store_fault` turns the
    raised error into its one line."""
    from experiments.search import process

    process.reset()
    signal.signal(signal.SIGTERM, process.terminated_handler)
    if os.environ.get("GLYPH_TRACEBACK") == "1":
        return
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropDatabaseErrors) for f in logger.filters):
        logger.addFilter(_DropDatabaseErrors())


class _DropDatabaseErrors:
    def filter(self, record) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


def store_fault(exc: BaseException) -> str | None:
    """One line for a tracking store that is damaged or locked (a SQLite or SQLAlchemy error
    anywhere in the exception's chain), naming the database; None for anything else."""
    import sqlite3

    from experiments.core import config

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.Error) or type(exc).__module__ == "sqlalchemy.exc":
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
            uri = config.tracking_uri()
            where = (
                uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else config.mask_url(uri)
            )
            if "locked" in reason or "busy" in reason:
                return (
                    f"tracking store {where} is locked by another process ({reason}); wait "
                    "for it to finish, or stop it, then rerun"
                )
            return (
                f"tracking store {where} cannot be read as an MLflow store ({reason}); restore "
                "it from a copy, or move it aside to start a new store"
            )
        exc = exc.__cause__ or exc.__context__
    return None
