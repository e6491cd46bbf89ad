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

import kornia.geometry.transform as KT
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from data_tools import Dataset
from experiments import tracking
from experiments.checkpoint import load_checkpoint
from experiments.steps import STEPS
from experiments.train import predict_logits

SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
# Task 2 steps whose training reads labelled TEST images: the "all" group's members
TASK2_LABELLED = (
    "task2-step2",
    "task2-step3",
    "task2-step3-long",
    "task2-mixed",
    "task2-transfer",
    "task2-transfer-white",
)


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


def final_runs(client: MlflowClient, step: str) -> list[Member]:
    """The newest COMPLETE final run of each study of `step`."""
    return [
        Member(run.info.run_id, step, model, run.data.metrics.get("best_val_acc", float("nan")))
        for model, run in tracking.newest_final_runs(client, step).items()
    ]


def best_k(client: MlflowClient, step: str, k: int) -> list[Member]:
    """The `k` final runs of `step` with the highest validation accuracy (ties: model name)."""
    members = final_runs(client, step)
    return sorted(members, key=lambda m: (-m.best_val_acc, m.model))[:k]


@torch.no_grad()
def probabilities(run_id: str, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """Softmax probabilities of one run's model on raw images (averaged over shifts with TTA)."""
    loaded = load_checkpoint(run_id)
    views = SHIFTS if tta else SHIFTS[:1]
    total = torch.zeros(len(images), 0)
    for dx, dy in views:
        shifted = images
        if (dx, dy) != (0, 0):
            translation = torch.tensor([[float(dx), float(dy)]]).expand(len(images), 2)
            shifted = KT.translate(images, translation, padding_mode="border", align_corners=True)
        x = loaded.preprocessing.transform(shifted)
        p = predict_logits(loaded.model, x).softmax(1)
        total = p if total.numel() == 0 else total + p
    return total / len(views)


class ProbabilityCache:
    """Each (run, TTA) pair is predicted once per report, however many ensembles share it."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self._cache: dict[tuple[str, bool], torch.Tensor] = {}

    def __call__(self, run_id: str, tta: bool) -> torch.Tensor:
        key = (run_id, tta)
        if key not in self._cache:
            self._cache[key] = probabilities(run_id, self.images, tta)
        return self._cache[key]


def evaluate_ensemble(
    name: str, members: list[Member], dataset: Dataset, tta: bool, cache: ProbabilityCache
) -> EnsembleResult:
    from experiments.evaluation import metrics_of

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
        if step.reuses or step.primary_eval != "TEST2":
            continue
        specs.append((f"{step.name}: best 1", (step.name,), 1))
        if k > 1:
            specs.append((f"{step.name}: best {k}", (step.name,), k))
    specs.append(("Task 2 labelled steps: all", TASK2_LABELLED, None))
    return specs


def run_ensembles(k: int, tta_options: tuple[bool, ...], dataset: Dataset) -> list[EnsembleResult]:
    """Every ensemble of `ensemble_specs(k)` with and without TTA, scored on `dataset`."""
    client = MlflowClient()
    cache = ProbabilityCache(dataset.images)
    results = []
    for name, steps, size in ensemble_specs(k):
        if size is None:
            members = [m for step in steps for m in final_runs(client, step)]
        else:
            members = best_k(client, steps[0], size)
        if not members:
            continue
        for tta in tta_options:
            results.append(evaluate_ensemble(name, members, dataset, tta, cache))
    return results


def members_text(members: list[Member]) -> str:
    return ", ".join(
        f"{m.step}/{m.model} ({m.run_id[:8]}, val {m.best_val_acc:.3f})" for m in members
    )


def summary(results: list[EnsembleResult]) -> dict[str, float]:
    """Flat metrics for the report run: `<name>/<tta>_acc`."""
    out = {}
    for r in results:
        key = r.name.replace(": ", "_").replace(" ", "_")
        if r.accuracy is not None:
            out[f"ensemble.{key}.{'tta' if r.tta else 'plain'}_acc"] = r.accuracy
    return out


def finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if np.isfinite(v)}
