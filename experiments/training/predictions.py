"""Each run's softmax probabilities, logged once when it trains and read back by every consumer.

A scored run (a final, a baseline, a recipe) logs `predictions.npz`: its probabilities on
every evaluation set and on a named validation set (SELECT2), that one also with
test-time augmentation. Entries are keyed by the set's data fingerprint, so predictions
of other data are never read for these. The report, the ensembles, the champions and
`promote` read them instead of re-running the models (`ProbabilityCache`). Each file's
sha256 is logged as a run tag (`sha256.<file>`) and checked on every read: a file without
that tag, one that differs from it, or one whose entries are not finite 2-D float arrays
is predicted again from the checkpoint, with one warning line.
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
DIGEST_PREFIX = "sha256."  # a run tag `sha256.<file>` holds each predictions file's digest


def key(fingerprint: str, tta: bool) -> str:
    """The entry of a set (by its data fingerprint) with or without TTA."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    return f"{digest}.tta{int(tta)}"


def write(folder: Path, entries: dict[str, np.ndarray], name: str = ARTIFACT) -> Path:
    """`name` (default `predictions.npz`) in `folder`, to be logged as an artifact, float32."""
    path = folder / name
    np.savez(path, **{name: np.asarray(p, dtype=np.float32) for name, p in entries.items()})
    return path


def digest_tag(name: str) -> str:
    """The run tag that holds the sha256 of the run's file `name`."""
    return f"{DIGEST_PREFIX}{name}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log_digest(path: Path, run_id: str | None = None) -> None:
    """Log the sha256 of the predictions file `path` as a tag of `run_id` (default: the
    active run); a reader trusts the file only when it matches."""
    if run_id is None:
        mlflow.set_tag(digest_tag(path.name), sha256(path))
    else:
        mlflow.MlflowClient().set_tag(run_id, digest_tag(path.name), sha256(path))


_warned: set[tuple[str, str, str]] = set()


def _warn(run_id: str, name: str, problem: str) -> None:
    """One warning line per run, file and problem in a process."""
    if (run_id, name, problem) in _warned:
        return
    _warned.add((run_id, name, problem))
    print(
        f"warning: run {run_id}: {name} {problem}; its sets are predicted again",
        file=sys.stderr,
        flush=True,
    )


def _run_tags(run_id: str) -> dict[str, str]:
    from experiments.tracking import results

    try:
        return results.run_tags(run_id) or {}  # no such run: nothing can be verified
    except Exception:  # an unreadable store: nothing can be verified either
        return {}


def _entries(path: str) -> dict[str, np.ndarray]:
    """The file's entries: each a finite 2-D array of floats (ValueError otherwise)."""
    entries = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            array = archive[key]
            if array.dtype.kind != "f":
                raise ValueError(f"entry {key[:40]} has dtype {array.dtype}")
            if array.ndim != 2:
                raise ValueError(f"entry {key[:40]} has shape {array.shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"entry {key[:40]} holds NaN or infinite values")
            entries[key] = array.astype(np.float32, copy=True)
    return entries


def logged(run_id: str, *names: str) -> dict[str, np.ndarray]:
    """The run's logged probabilities by entry, from `names` (default: both files); empty
    when it logged none. A file is read only when its sha256 matches the digest logged on
    its run (`digest_tag`) and every entry is a finite 2-D float array; a file without a
    logged digest, one that differs from it, or one that cannot be read as a plain array
    archive counts as not logged (one warning line; its sets are predicted again). An entry
    is read from the first file that holds it."""
    store.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    entries: dict[str, np.ndarray] = {}
    tags: dict[str, str] | None = None
    with tempfile.TemporaryDirectory(prefix="glyph-predictions-") as scratch:
        for name in names or (ARTIFACT, ANSWER_ARTIFACT):
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=scratch
                )
            except Exception:  # a run without it (MLflow raises several types)
                continue
            tags = _run_tags(run_id) if tags is None else tags
            recorded = tags.get(digest_tag(name))
            if not recorded:
                _warn(run_id, name, "has no logged sha256 digest, so it is not trusted")
                continue
            if sha256(Path(path)) != recorded:
                _warn(run_id, name, "differs from the sha256 digest logged on its run")
                continue
            try:
                found = _entries(path)
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                reason = str(exc) if type(exc) is ValueError else type(exc).__name__
                _warn(run_id, name, f"cannot be read ({one_line(reason)[:120]})")
                continue
            for key, array in found.items():
                entries.setdefault(key, array)
    return entries


def one_line(text: str) -> str:
    """`text` with its non-printable characters escaped, for a warning line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
