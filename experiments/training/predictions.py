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
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from experiments.tracking import store

ARTIFACT = "predictions.npz"


def key(fingerprint: str, tta: bool) -> str:
    """The entry of a set (by its data fingerprint) with or without TTA."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    return f"{digest}.tta{int(tta)}"


def write(folder: Path, entries: dict[str, np.ndarray]) -> Path:
    """`predictions.npz` in `folder` (logged with the run's other artifacts), float32."""
    path = folder / ARTIFACT
    np.savez(path, **{name: np.asarray(p, dtype=np.float32) for name, p in entries.items()})
    return path


def logged(run_id: str) -> dict[str, np.ndarray]:
    """The run's logged probabilities by entry; empty when it logged none."""
    store.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="glyph-predictions-") as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=ARTIFACT, dst_path=scratch
            )
        except Exception:  # an older run without the artifact (MLflow raises several types)
            return {}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name].copy() for name in archive.files}
