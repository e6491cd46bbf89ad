"""Ensembles and test-time augmentation, as rows of the report.

An ensemble averages the softmax probabilities of its members, each member
with its own preprocessing. Members are chosen without evaluation labels:

  best k of a step   the step's final runs (one per model study), ranked by
                     best_val_acc on the step's own validation split;
  all of a group     every final run of the named steps, a rule fixed before
                     any result is seen (no ranking at all).

Test-time augmentation (TTA) averages each member over the image and its four
one-pixel shifts (border pixels repeated, so the background stays the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from data_tools import SELECTION, Dataset
from experiments.core.steps import STEPS
from experiments.tracking import results
from experiments.training.checkpoint import load_checkpoint
from experiments.training.evaluation import metrics_of
from experiments.training.inference import (  # noqa: F401 (re-exported: the report's TTA)
    SHIFTS,
    ProbabilityCache,
    probabilities,
    shifted_views,
)

# Task 2 steps whose training reads labelled TEST images: the "all" group's members
# every Task 2 step that trains on labelled second-script images (each validates on SELECT2)
TASK2_LABELLED = tuple(name for name, step in STEPS.items() if step.val_set == SELECTION)


@dataclass
class Member:
    run_id: str
    step: str
    model: str
    best_val_acc: float


@dataclass
class EnsembleResult:
    name: str
    eval_set: str
    tta: bool
    members: list[Member]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get(f"{self.eval_set}_acc")


def final_runs(step: str) -> list[Member]:
    """The newest COMPLETE final run of each study of `step`."""
    frame = results.study_models(step)
    return [
        Member(row["run_id"], step, model, float(row.get("metrics.best_val_acc", np.nan)))
        for model, row in frame.iterrows()
    ]


def best_k(step: str, k: int) -> list[Member]:
    """The `k` final runs of `step` with the highest validation accuracy (ties: model name)."""
    return sorted(final_runs(step), key=lambda m: (-m.best_val_acc, m.model))[:k]


def evaluate_ensemble(
    name: str, members: list[Member], dataset: Dataset, tta: bool, cache: ProbabilityCache
) -> EnsembleResult:
    result = EnsembleResult(name, dataset.name, tta, members)
    if not members:
        return result
    mean = torch.stack([cache(m.run_id, tta) for m in members]).mean(0)
    predictions = mean.argmax(1).numpy()
    result.metrics, _ = metrics_of(
        dataset.name, dataset.labels.numpy(), predictions, dataset.white.numpy()
    )
    return result


def ensemble_specs(k: int) -> list[tuple[str, tuple[str, ...], int | None]]:
    """(name, steps, k) of the report's ensembles: best k (and best 1) of each training step
    evaluated on TEST2, and all final runs of the labelled Task 2 steps together."""
    specs: list[tuple[str, tuple[str, ...], int | None]] = []
    for step in STEPS.values():
        if step.kind == "reuse" or step.primary_eval != "TEST2":
            continue
        specs.append((f"{step.name}: best 1", (step.name,), 1))
        if k > 1:
            specs.append((f"{step.name}: best {k}", (step.name,), k))
    specs.append(("Task 2 labelled steps: all", TASK2_LABELLED, None))
    return specs


def run_ensembles(
    k: int, tta_options: tuple[bool, ...], dataset: Dataset, cache: ProbabilityCache | None = None
) -> list[EnsembleResult]:
    """Every ensemble of `ensemble_specs(k)` with and without TTA, scored on `dataset`
    (`cache`: probabilities on `dataset` already predicted, shared with the caller)."""
    cache = cache or ProbabilityCache(dataset.images, load_checkpoint, dataset.fingerprint)
    results = []
    for name, steps, size in ensemble_specs(k):
        if size is None:
            members = [m for step in steps for m in final_runs(step)]
        else:
            members = best_k(steps[0], size)
        if not members:
            continue
        for tta in tta_options:
            results.append(evaluate_ensemble(name, members, dataset, tta, cache))
    return results


def members_text(members: list[Member]) -> str:
    return ", ".join(
        f"{m.step}/{m.model} ({m.run_id[:8]}, val {m.best_val_acc:.3f})" for m in members
    )


def to_frame(ensembles: list[EnsembleResult]) -> pd.DataFrame:
    """One row per ensemble: name, k, TTA, evaluation set, accuracy, members."""
    return pd.DataFrame(
        [
            {
                "ensemble": r.name,
                "k": len(r.members),
                "tta": r.tta,
                "eval_set": r.eval_set,
                "accuracy": r.accuracy,
                "acc_low": r.metrics.get(f"{r.eval_set}_acc_ci_low"),
                "acc_high": r.metrics.get(f"{r.eval_set}_acc_ci_high"),
                "n_images": r.metrics.get(f"{r.eval_set}_n"),
                "members": " ".join(f"{m.step}/{m.model}:{m.run_id}" for m in r.members),
                "members_text": members_text(r.members),
            }
            for r in ensembles
        ],
        columns=[
            *("ensemble", "k", "tta", "eval_set", "accuracy", "acc_low", "acc_high", "n_images"),
            *("members", "members_text"),
        ],
    )


def summary(ensembles: list[EnsembleResult]) -> dict[str, float]:
    """Flat finite metrics for the report run: `ensemble.<name>.<plain|tta>_acc`."""
    out = {}
    for r in ensembles:
        key = r.name.replace(": ", "_").replace(" ", "_")
        if r.accuracy is not None and np.isfinite(r.accuracy):
            out[f"ensemble.{key}.{'tta' if r.tta else 'plain'}_acc"] = r.accuracy
    return out
