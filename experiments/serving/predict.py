"""`python -m experiments predict`: a trained model applied to new `.npy` files.

The model is an MLflow model URI (`models:/glyph-task2@champion`, `runs:/<id>/model`)
or a run id (its logged model, else its checkpoint). Inputs pass the same strict
reader as the datasets (`data_tools.reader.read_inputs`): a bad file is one error
line and nothing is written. The output CSV has one row per image: path,
predicted class (the class folder name, 1..6), its probability, and where the
model carries a new-script detector, its score and `unknown`. With class
folders the labels are known, and accuracy, coverage and accuracy on the
answered images are printed.

The model's files are copied out of the store and checked before MLflow reads them: a
registered version's files against the sha256 digests recorded when it was promoted
(`integrity.py`), and every MLmodel for naming this package's loader and no code. `--out`
may be a new file or an existing regular file that is no input, no dataset file and no part
of the tracking store or the study storage (`check_out`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from data_tools.reader import read_inputs
from experiments.core import config
from experiments.core.steps import STEPS, training_step
from experiments.serving import integrity
from experiments.serving.pyfunc_model import classify
from experiments.tracking import results, store
from experiments.training.checkpoint import RUN_ID, load_checkpoint
from experiments.training.runner import LOADER_MODULE

BATCH = 2048


def model_uri(source: str) -> str:
    """An MLflow model URI for `source`: a URI as given, or a run id's logged model."""
    if source.startswith(("models:/", "runs:/")) or "://" in source:
        return source
    if RUN_ID.fullmatch(source):
        return f"runs:/{source}/model"
    raise ValueError(f"--model {source}: expected an MLflow model URI, a run id or STEP/MODEL")


class _CheckpointModel:
    """A run without a logged MLflow model (a trial, a `train` run): its checkpoint, same output."""

    def __init__(self, run_id: str):
        self.loaded = load_checkpoint(run_id)

    def predict(self, images: np.ndarray) -> pd.DataFrame:
        return classify(self.loaded, images)


def load_model(source: str):
    """The model behind `source` (its MLflow model, else a run's checkpoint); one-line errors.

    The model's files are copied out of the store first; a registered version's copy is
    checked against the digests recorded when it was promoted (`integrity.verified_copy`),
    and MLflow loads the checked copy."""
    uri = model_uri(source)  # a malformed source fails before any store is opened or made
    store.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="glyph-model-") as scratch:
        try:
            local = checked_local_model(uri, Path(scratch))
        except ValueError as exc:
            raise ValueError(f"--model {source}: {exc}") from None
        except Exception as exc:  # MLflow raises several types for a missing model, run or alias
            return _checkpoint_or_refuse(source, uri, exc)
        try:
            return mlflow.pyfunc.load_model(str(local))
        except Exception as exc:
            return _checkpoint_or_refuse(source, uri, exc)


def checked_local_model(uri: str, scratch: Path) -> Path:
    """A local copy of the model at `uri` that is safe to hand to MLflow: a registered
    version's files match their recorded digests, and its MLmodel names this package's
    loader and carries no code. ValueError (one line) otherwise; MLflow's own errors (no
    such model, run or alias) pass through."""
    local = integrity.verified_copy(uri, scratch / "registered")
    if local is None:
        local = integrity.download(uri, scratch / "logged")
    foreign = _foreign_code(local)
    if foreign is not None:
        raise ValueError(
            f"{uri} is not loaded: its MLmodel {foreign}, so loading it would run code from "
            "the store (models logged before models were loaded from the installed "
            "package); re-promote with `make promote`, or retrain the run"
        )
    return local


def _checkpoint_or_refuse(source: str, uri: str, exc: Exception):
    """A run's checkpoint when `source` is a run id without a loadable logged model, else
    the one-line error for `exc`."""
    moved = _moved_module(exc)
    if moved:
        raise ValueError(
            f"--model {source}: {uri} was registered by an older layout of this project "
            f"(its code imports {moved}, which has moved); re-promote it with `make promote`"
        ) from None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if RUN_ID.fullmatch(source):
        try:
            return _CheckpointModel(source)
        except (OSError, ValueError):
            pass
    raise ValueError(f"--model {source}: cannot load {uri} ({first[:200]})") from None


def _foreign_code(folder: Path) -> str | None:
    """Why the model in local `folder` would run code other than this installed package's
    loader (only its MLmodel is read), or None when it would not."""
    import yaml

    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"cannot be read ({type(exc).__name__})"
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    flavor = (flavors or {}).get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        return "has no python_function flavor"
    if flavor.get("loader_module") != LOADER_MODULE:
        return f"names loader {flavor.get('loader_module') or flavor.get('python_model')!r}"
    if flavor.get("code") or flavor.get("python_model"):
        return "carries code"
    if flavor.get("predict_fn", "predict") != "predict":
        return f"names predict_fn {flavor['predict_fn']!r}"
    return None


def _moved_module(exc: BaseException) -> str | None:
    """The project module a stored model's code imports but this layout lacks, if that is why
    loading failed (models registered before experiments/ became subpackages)."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("experiments."):
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


def predict_files(paths: list[str], source: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Predictions for every image under `paths`, and the known labels (-1: none)."""
    raw = read_inputs(paths)  # every file checked before anything is predicted or written
    model = load_model(source)
    images = raw.images[:, None]
    parts = [model.predict(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    frame.insert(0, "path", list(raw.files))
    return frame, raw.labels


def summary(frame: pd.DataFrame, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, coverage and accuracy on the answered images, over the labelled rows."""
    known = labels >= 0
    if not known.any():
        return {}
    right = frame["predicted"].to_numpy()[known] == labels[known] + 1
    out = {"labelled": int(known.sum()), "accuracy": float(right.mean())}
    if "unknown" in frame:
        answered = ~frame["unknown"].to_numpy(dtype=bool)[known]
        out["coverage"] = float(answered.mean())
        out["answered_accuracy"] = float(right[answered].mean()) if answered.any() else float("nan")
    return out


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula


def check_out(out: Path, inputs: list[str]) -> None:
    """Refuse an output path that is not a new file or an existing regular file, or that is
    part of an input or a store: one of the inputs or inside an input folder, inside one of
    the datasets (DATA_DIR's TRAIN, TEST, TEST2), inside the tracking store's folder
    (MLRUNS_DIR), the tracking database (and its SQLite side files) or the Optuna journal
    (and its lock files). A FIFO, a device, a socket or a folder is refused too."""
    target = out.expanduser().resolve()  # a symlink is judged by what it points at
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source or (source.is_dir() and target.is_relative_to(source)):
            raise ValueError(f"--out {out}: would write over or inside the input {given}")
    for name in ("TRAIN", "TEST", "TEST2"):  # the datasets, inputs of this run or not
        dataset = (config.data_dir() / name).resolve()
        if target.is_relative_to(dataset):
            raise ValueError(f"--out {out}: would write inside the dataset folder {dataset}")
    problem = _store_part(target)
    if problem:
        raise ValueError(f"--out {out}: {problem}; choose another path")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return  # a new file
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot be checked ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"--out {out}: is a folder, expected a CSV file path")
    if not stat.S_ISREG(mode):
        kind = _special_kinds(mode)
        raise ValueError(f"--out {out}: is {kind}, not a regular file; expected a CSV file path")


def _special_kinds(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _store_part(target: Path) -> str | None:
    """Why `target` (resolved) is part of the tracking store or the study storage, or None."""
    folder = config.mlruns_dir().expanduser().resolve()
    if target.is_relative_to(folder):
        return f"lies inside the tracking store folder {folder}"
    files = [path for path in (_sqlite_file(config.tracking_uri()),) if path is not None]
    storage = config.study_storage()
    files.append(_sqlite_file(storage) if "://" in storage else Path(storage))
    for stored in files:
        if stored is None:
            continue
        stored = stored.expanduser().resolve()
        # the file itself and its side files: SQLite's -journal/-wal/-shm, the journal's .lock
        if target.parent == stored.parent and target.name.startswith(stored.name):
            return f"is part of the store {stored}"
    return None


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI, or None for any other URI or an in-memory one."""
    if not uri.startswith("sqlite:"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
    except Exception:  # a URI SQLAlchemy cannot parse: the store check refuses it elsewhere
        return None
    return Path(database) if database and database != ":memory:" else None


def _spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula, prefixed with a quote."""
    safe = frame.copy()
    for column in safe.select_dtypes(include="object").columns:
        safe[column] = safe[column].map(
            lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
        )
    return safe


def write_csv(frame: pd.DataFrame, out: Path) -> None:
    """Write atomically with the umask's mode: a half-written CSV never appears under `out`,
    a failure leaves no temporary file, and every error names the path."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            _spreadsheet_safe(frame).to_csv(f, index=False)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, out)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise ValueError(f"--out {out}: cannot write ({exc.strerror or exc})") from None


def resolve_source(source: str) -> str:
    """`STEP/MODEL` (a declared step's study answer) as a run id; anything else as given."""
    step, slash, model = source.partition("/")
    if not slash or step not in STEPS or source.startswith(("models:", "runs:")):
        return source
    run = results.final_run(training_step(step).name, model)
    if run is None:
        raise ValueError(f"--model {source}: no finished study of that step and model")
    return run["run_id"]
