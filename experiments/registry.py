"""The Model Registry: each task's champion registered as `glyph-task1` / `glyph-task2`, alias
`champion`, in a format that is safe to load (models from code + a weights-only checkpoint).

Champion rules, written before any score is read (validation only, never TEST
or TEST2 labels):

- Task 2 (`CHAMPION_STEP[2]`): among the study answers of task2-step3 (trained on
  TEST's white half, the data closest to TEST2), the one with the highest
  validation accuracy; ties: fewer parameters.
- Task 1: among the study answers of task1-step1 (TRAIN only), the one with the
  highest TRAIN validation accuracy; ties: fewer parameters. It ships with the
  new-script detector declared in advance (max softmax), its threshold the 95th
  percentile of its score on TRAIN validation images (5 % of in-script images
  refused), so it can answer "unknown".

Re-promoting the same source run with the same rule makes no new version; the
alias `champion` always points at the version of the current champion.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from data_tools import load_split
from experiments import config, results, tracking
from experiments.checkpoint import load_checkpoint
from experiments.runner import log_pyfunc_model
from experiments.shift import REFUSE_FRACTION, logits_and_features
from experiments.train import split_indices
from models import count_parameters

REGISTRY_EXPERIMENT = "registry"
ALIAS = "champion"
CHAMPION_STEP = {1: "task1-step1", 2: "task2-step3"}
RULES = {
    1: "task1-step1 study answer with the highest TRAIN validation accuracy (ties: fewer "
    "parameters); detector max_softmax, threshold = 95th percentile on TRAIN validation",
    2: "task2-step3 study answer with the highest validation accuracy (ties: fewer parameters)",
}


@dataclass
class Champion:
    task: int
    run: pd.Series
    selection_acc: float
    detector: dict | None = None

    @property
    def name(self) -> str:
        return f"glyph-task{self.task}"

    @property
    def run_id(self) -> str:
        return self.run["run_id"]


def choose(task: int) -> Champion:
    """The champion of `task` by its rule (validation accuracy; ties: the smaller model)."""
    step = CHAMPION_STEP[task]
    frame = results.study_models(step)
    if frame.empty:
        raise RuntimeError(f"no {step} study has finished: run `make {step}` first")
    sizes = {
        model: count_parameters(load_checkpoint(row["run_id"]).model)
        for model, row in frame.iterrows()
    }
    ranked = sorted(
        frame.index, key=lambda m: (-float(frame.loc[m, "metrics.best_val_acc"]), sizes[m], m)
    )
    run = frame.loc[ranked[0]]
    champion = Champion(task, run, float(run["metrics.best_val_acc"]))
    if task == 1:
        champion.detector = detector_of(run["run_id"])
    return champion


def detector_of(run_id: str) -> dict:
    """The max-softmax detector's threshold from the run's own TRAIN validation images."""
    loaded = load_checkpoint(run_id)
    train = load_split("TRAIN", config.data_dir(), config.cache_dir())
    cfg = loaded.checkpoint["config"]
    _, val_idx = split_indices(train.labels, cfg["val_fraction"], cfg["split_seed"])
    logits, _ = logits_and_features(loaded, train.images[val_idx])
    score = (1 - logits.softmax(1).max(1).values).numpy()
    threshold = float(np.quantile(score, 1 - REFUSE_FRACTION))
    return {"name": "max_softmax", "threshold": threshold, "refuse_fraction": REFUSE_FRACTION}


def _key(champion: Champion) -> str:
    text = f"{champion.run_id}|{RULES[champion.task]}|{champion.detector}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def promote(task: int) -> tuple[Champion, str, bool]:
    """Register the champion of `task` (once per source run and rule); point `champion` at it.

    Returns the champion, its version and whether a new version was made.
    """
    champion = choose(task)
    tracking.init()
    client = MlflowClient()
    key = _key(champion)
    existing = [
        v
        for v in client.search_model_versions(f"name = '{champion.name}'")
        if v.tags.get("promotion_key") == key
    ]
    created = not existing
    version = existing[0].version if existing else _register(champion, key)
    client.set_registered_model_alias(champion.name, ALIAS, version)
    return champion, str(version), created


def _register(champion: Champion, key: str) -> str:
    checkpoint = load_checkpoint(champion.run_id).checkpoint
    if champion.detector:
        checkpoint = {**checkpoint, "detector": champion.detector}
    run = champion.run
    tags = {
        "selection_rule": RULES[champion.task],
        "selection_acc": f"{champion.selection_acc:.6f}",
        "step": results.tag(run, "step"),
        "model": results.tag(run, "model"),
        "source_run": champion.run_id,
        "promotion_key": key,
        **{k[len("tags.") :]: v for k, v in run.items() if str(k).startswith("tags.data.")},
        "git_commit": tracking.environment_tags()["git_commit"],
    }
    if champion.detector:
        tags["detector"] = champion.detector["name"]
        tags["detector_threshold"] = f"{champion.detector['threshold']:.6f}"
    experiment = tracking.experiment_id(REGISTRY_EXPERIMENT)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(experiment_id=experiment, run_name=f"promote-{champion.name}", tags=tags),
    ):
        path = Path(tmp) / "model.pt"
        torch.save(checkpoint, path)
        log_pyfunc_model(path)
        uri = f"runs:/{mlflow.active_run().info.run_id}/model"
    version = mlflow.register_model(uri, champion.name, tags=tags)
    MlflowClient().update_model_version(
        champion.name, version.version, description=f"Champion: {RULES[champion.task]}."
    )
    return str(version.version)
