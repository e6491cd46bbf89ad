"""MLflow plumbing: the store, experiments with absolute artifact locations, run tags.

The default store is `mlruns/mlflow.db` (SQLite, absolute path) with artifacts
in `mlruns/artifacts/<experiment>/`. Experiments are created once with an
explicit artifact location, so artifacts never land in whatever `./mlruns`
the current directory has. With a tracking server (`MLFLOW_TRACKING_URI=http://...`)
the server decides where artifacts go.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.core import config
from experiments.core.steps import PRETRAIN, STEPS
from experiments.tracking.relocate import check_located

DATA_ANALYSIS_EXPERIMENT = "data-analysis"


_OPENED: set[str] = set()  # the SQLite stores this process has opened (created if new)


def init() -> str:
    """Point MLflow at the project's store; create the store folder, and open (for a new
    local SQLite store: create) the database under a file lock. Returns the URI."""
    uri = config.tracking_uri()
    if uri not in _OPENED:  # refused before anything is created
        config.check_store_path()
        config.check_tracking_uri(uri)
    database = config.sqlite_database(uri)
    if database is not None and uri not in _OPENED:
        # a local store keeps its artifacts beside its database, whether it is reached by
        # MLRUNS_DIR or by an explicit MLFLOW_TRACKING_URI: a copied one is refused either way
        check_located(database, database.parent)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        config.artifacts_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if database is not None and uri not in _OPENED:
        _open_sqlite_store(uri)
    if uri.startswith(("http://", "https://")) and uri not in _OPENED:
        _check_server(uri)
    if uri.startswith("postgresql") and uri not in _OPENED:
        _check_database(uri)
    return uri


def _check_database(uri: str) -> None:
    """Reach a database store once, within `CONNECT_TIMEOUT` seconds (MLflow itself retries
    for minutes); an unreachable one is one line, URL masked."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": CONNECT_TIMEOUT})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # SQLAlchemy/driver errors: many types, many lines
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(
            f"tracking store {config.mask_url(uri)} cannot be reached: {config.mask_secrets(first)}"
        ) from None
    _OPENED.add(uri)


CONNECT_TIMEOUT = 5  # seconds before an unreachable database is an error


def identity() -> str:
    """What tells this tracking store from any other, a copy of it excepted: the creation time
    of MLflow's Default experiment, made with the store. A study remembers it
    (`experiments.search.study.bind_store`), so a study storage is never used with another
    store's runs. Read only: nothing is written."""
    init()
    created = MlflowClient().get_experiment(DEFAULT_EXPERIMENT_ID).creation_time
    return f"mlflow store created {created}"


DEFAULT_EXPERIMENT_ID = "0"


# MLflow retries an unreachable server for minutes by default (7 retries, 120 s each):
# a command fails within about 30 s instead, unless the user sets these
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _check_server(uri: str) -> None:
    """Reach the tracking server once, quickly; an unreachable one is one line, URL masked."""
    import urllib.error
    import urllib.request

    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    parsed = urllib.parse.urlsplit(uri)
    netloc = parsed.netloc.rpartition("@")[2]  # credentials go in a header, never a log line
    health = urllib.parse.urlunsplit(
        (parsed.scheme, netloc, parsed.path.rstrip("/") + "/health", "", "")
    )
    try:
        with urllib.request.urlopen(health, timeout=10):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = type(getattr(exc, "reason", exc)).__name__
        raise RuntimeError(
            f"tracking server {config.mask_url(uri)} is unreachable ({reason}); start it or "
            "unset MLFLOW_TRACKING_URI to use the local store"
        ) from None
    _OPENED.add(uri)


def _open_sqlite_store(uri: str) -> None:
    """MLflow creates a new SQLite store's tables without a lock: two processes opening one
    at once (`make reproduce`'s first parallel jobs) collide, and one fails with "table
    alembic_version already exists". The first opener here creates it while the others wait.
    A store whose folder cannot hold the lock file (read-only) is opened without it."""
    from filelock import FileLock

    database = config.sqlite_database(uri)
    if database.name == ":memory:" or not database.name:
        _OPENED.add(uri)
        return
    try:
        lock = FileLock(f"{database}.lock")
        with lock:
            MlflowClient(uri)  # builds the store: creates and migrates the tables if needed
    except OSError as exc:  # no lock file possible: no permission, or a read-only mount
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not database.exists():
            raise
        MlflowClient(uri)
    _OPENED.add(uri)


def store_exists() -> bool:
    """False for a local SQLite store whose database file is not there yet (reads create none).
    A store path or tracking URI the project cannot use is its one line here too, before a
    read reports the store as empty."""
    uri = config.tracking_uri()
    config.check_store_path()
    config.check_tracking_uri(uri)
    database = config.sqlite_database(uri)
    return database is None or database.exists()


EXPERIMENT_NOTES = {
    DATA_ANALYSIS_EXPERIMENT: "The three datasets: counts, backgrounds, figures.",
    "task1-shift": "Task 1 without TEST labels: new-script detectors, selective prediction.",
    "report": "The comparison report's files, one run per `make report`.",
    "registry": "One run per promoted champion: the model that the Model Registry version "
    "(glyph-task1 / glyph-task2, alias champion) points to.",
}


def _note(name: str) -> str:
    """The one-line description the MLflow UI shows for experiment `name`."""
    if name in STEPS:
        step = STEPS[name]
        return f"{step.description}. Labels read: {step.label_use}."
    if name == PRETRAIN.name:
        return PRETRAIN.description
    return EXPERIMENT_NOTES.get(name, "")


def experiment_id(name: str) -> str:
    """Get or create experiment `name`, with an absolute artifact location for a local store
    and its description (the UI's note) set once."""
    init()
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        if _note(name) and "mlflow.note.content" not in existing.tags:
            client.set_experiment_tag(existing.experiment_id, "mlflow.note.content", _note(name))
        return existing.experiment_id
    location = None
    if config.tracking_uri().startswith(("sqlite:", "file:")):
        folder = config.artifacts_dir() / name.replace("/", "_")
        location = folder.resolve().as_uri()
    tags = {"mlflow.note.content": _note(name)} if _note(name) else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=tags)
    except mlflow.exceptions.MlflowException:
        # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def log_input(dataset, context: str, attempts: int = 5) -> None:
    """`mlflow.log_input` that survives two processes logging the same dataset at once.

    MLflow's SQL store checks that a dataset is absent, then inserts it; when two
    workers' trials log the same set at the same moment, the second insert breaks the
    unique key and the call fails (BAD_REQUEST, HTTP 400 from a server, so the client
    does not retry). Tried again, the call finds the dataset and links it.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("unique" in text or "duplicate" in text):
                raise
            time.sleep(0.1 * (attempt + 1))


def mark_interrupted(client: MlflowClient, run_id: str, end_time: int | None = None) -> None:
    """End a run whose process died: KILLED, `state=FAIL`, `interrupted=true`, ended at
    `end_time` (milliseconds since the epoch; None: now). Pass when it last logged
    (`results.last_logged`), not when it is found dead: a machine switched off for a night
    would otherwise count as the run's time."""
    client.set_tag(run_id, "state", "FAIL")
    client.set_tag(run_id, "interrupted", "true")
    client.set_terminated(run_id, status="KILLED", end_time=end_time)


MODEL_PACKAGES = ("torch", "numpy", "pandas", "mlflow", "kornia", "scikit-learn", "sqlalchemy")


def requirements() -> list[str]:
    """Pinned requirements of a logged model: the versions this process runs."""
    pinned = []
    for package in MODEL_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pinned.append(f"{package}=={metadata.version(package)}")
    return pinned


def environment_tags() -> dict[str, str]:
    """Git commit and package versions: what is needed to rerun a run."""
    tags = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "numpy", "mlflow", "optuna", "kornia", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=config.PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # changed code, not the generated outputs (reports/, the README's tables) that a
        # report or a benchmark writes on its way
        generated = [":(exclude)reports", ":(exclude)README.md"]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *generated],
            cwd=config.PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        tags["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        tags["git_commit"] = "unknown"
    return tags


def log_data_analysis(summaries: Mapping[str, dict], files: Sequence[Path]) -> str:
    """Log the data analysis as one run named `data-analysis`; return its id."""
    exp = experiment_id(DATA_ANALYSIS_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=exp, run_name="data-analysis", tags=environment_tags()
    ) as run:
        metrics = {}
        for name, s in summaries.items():
            metrics.update(
                {
                    f"{name}_images": s["images"],
                    f"{name}_white_background": s["white_background"],
                    f"{name}_black_background": s["black_background"],
                    f"{name}_mean": s["mean"],
                    f"{name}_std": s["std"],
                }
            )
            mlflow.set_tag(f"data.{name}_fingerprint", s["fingerprint"])
        mlflow.log_metrics(metrics)
        for path in files:
            mlflow.log_artifact(
                str(path), artifact_path="figures" if path.suffix == ".png" else None
            )
        with tempfile.TemporaryDirectory() as tmp:
            summary = Path(tmp) / "summaries.json"
            summary.write_text(json.dumps(summaries, indent=2))
            mlflow.log_artifact(str(summary))
        return run.info.run_id


def log_measurement(
    experiment: str, params: Mapping[str, object], table, files: Sequence[Path]
) -> str:
    """Log one measurement (the fidelity or levers experiment) as a run of `experiment`: its
    parameters, its result table as `table.csv` and the report files it wrote; return its id."""
    with mlflow.start_run(
        experiment_id=experiment_id(experiment), run_name=experiment, tags=environment_tags()
    ) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "table.csv"
            table.to_csv(csv, index=False)
            mlflow.log_artifact(str(csv))
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id
