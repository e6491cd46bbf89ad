"""`python -m experiments predict`: a trained model applied to new `.npy` files.

The model is an MLflow model URI (`models:/glyph-task2@champion`, `runs:/<id>/model`)
or a run id (its logged model, else its checkpoint). Inputs pass the same strict
reader as the datasets (`data_tools.reader.read_inputs`): a bad file is one error
line and nothing is written. The output CSV has one row per image: path,
predicted class (the class folder name, 1..6), its probability, and where the
model carries a new-script detector, its score and `unknown`. With class
folders the labels are known, and accuracy, coverage and accuracy on the
answered images are printed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from data_tools.reader import read_inputs
from experiments import results, tracking
from experiments.checkpoint import RUN_ID

BATCH = 2048


def model_uri(source: str) -> str:
    """An MLflow model URI for `source`: a URI as given, or a run id's logged model."""
    if "://" in source or source.startswith("models:/"):
        return source
    if RUN_ID.fullmatch(source):
        return f"runs:/{source}/model"
    raise ValueError(f"--model {source}: expected an MLflow model URI or a run id")


def load_model(source: str):
    """The pyfunc model behind `source`; a one-line error when there is none."""
    tracking.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = model_uri(source)
    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MLflow raises several types for a missing model, run or alias
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--model {source}: cannot load {uri} ({first[:200]})") from None


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


def write_csv(frame: pd.DataFrame, out: Path) -> None:
    """Write atomically: a half-written CSV never appears under `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as tmp:
        frame.to_csv(tmp.name, index=False)
    os.replace(tmp.name, out)


def selected_run(step: str, model: str) -> str:
    """A study's answer run id (for `--model STEP/MODEL` convenience)."""
    run = results.final_run(step, model)
    if run is None:
        raise ValueError(f"--model {step}/{model}: no finished study of that step and model")
    return run["run_id"]
