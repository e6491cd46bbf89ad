"""Each run's softmax probabilities, logged once when it trains and read back by every consumer.

A scored run (a final, a baseline, a recipe) logs `predictions.npz`: its probabilities on
every evaluation set and on a named validation set (SELECT2), that one also with
test-time augmentation. Entries are keyed by the set's data fingerprint, so predictions
of other data are never read for these. The report, the ensembles, the champions and
`promote` read them instead of re-running the models (`ProbabilityCache`); runs logged
before this existed are predicted as before.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import mlflow
import numpy as np

from experiments.tracking import store

ARTIFACT = "predictions.npz"
# a study answer's TTA probabilities on its evaluation sets, logged when it is selected
# (`runner.log_answer_tta`): the Task 2 champions are TTA ensembles of answers
ANSWER_ARTIFACT = "predictions_answer_tta.npz"


def key(fingerprint: str, tta: bool) -> str:
    """The entry of a set (by its data fingerprint) with or without TTA."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    return f"{digest}.tta{int(tta)}"


def write(folder: Path, entries: dict[str, np.ndarray], name: str = ARTIFACT) -> Path:
    """`name` (default `predictions.npz`) in `folder`, to be logged as an artifact, float32."""
    path = folder / name
    np.savez(path, **{name: np.asarray(p, dtype=np.float32) for name, p in entries.items()})
    return path


def logged(run_id: str, *names: str) -> dict[str, np.ndarray]:
    """The run's logged probabilities by entry, from `names` (default: both files); empty
    when it logged none. A file that cannot be read as a plain array archive counts as not
    logged (one warning line; its sets are predicted again). An entry is read from the first
    file that holds it."""
    store.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    entries: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="glyph-predictions-") as scratch:
        for name in names or (ARTIFACT, ANSWER_ARTIFACT):
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=scratch
                )
            except Exception:  # a run without it (MLflow raises several types)
                continue
            try:
                with np.load(path, allow_pickle=False) as archive:
                    for key in archive.files:
                        entries.setdefault(key, archive[key].copy())
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                print(
                    f"warning: run {run_id}: {name} cannot be read ({type(exc).__name__}); "
                    "its sets are predicted again",
                    file=sys.stderr,
                    flush=True,
                )
    return entries
