"""Transfer for Task 2: start from a model trained on TRAIN, fine-tune it on TEST or TRAIN3.

The starting point of a transfer step (a step with `pretrain="TRAIN"`) is the
task1-step1 study's final run of the same model: TRAIN only, its settings
searched on TRAIN's validation split. When the step fixes another polarity than
that run used (or no such run exists yet), a dedicated pretraining run is
trained once on TRAIN with the same settings and that polarity, logged in the
`task2-pretrain` experiment, and found again by a key of its settings.

The fine-tune keeps the pretrained architecture and normalization; the search
chooses the fine-tuning learning rate, which layers are frozen, the epochs and
the augmentation (`suggest_fine_tune`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from mlflow.tracking import MlflowClient

from experiments import tracking
from experiments.steps import PRETRAIN, Step

SOURCE_STEP = "task1-step1"
FINE_TUNE_FIXED = {"optimizer": "adam", "schedule": "cosine", "batch_size": 64, "weight_decay": 0.0}
FINE_TUNE_DEFAULTS = {"lr": 1e-3, "freeze": "none", "epochs": 10, "augmentation": "affine"}
# what a pretrained checkpoint decides for its fine-tunes (the rest is the fine-tune's own)
INHERITED = ("normalization", "polarity")


def suggest_fine_tune(trial: optuna.Trial, model_name: str) -> dict[str, Any]:
    """The searched settings of a transfer trial (flat `TrainConfig` overrides)."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "freeze": trial.suggest_categorical("freeze", ["none", "early", "body"]),
        "epochs": trial.suggest_int("epochs", 3, 12),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.1),
        "augmentation": trial.suggest_categorical("augmentation", ["none", "affine"]),
    }
    if params["augmentation"] == "affine":
        params["affine_strength"] = trial.suggest_float("affine_strength", 0.3, 1.0)
    return params


def _pretrain_settings(source, model: str) -> dict[str, Any]:
    """The TRAIN settings to pretrain with: the source run's, or the defaults without one."""
    from experiments.train import TrainConfig

    if source is None:
        return TrainConfig(model=model).flat()
    from experiments.checkpoint import load_checkpoint

    return dict(load_checkpoint(source.info.run_id).checkpoint["config"])


def pretrain_key(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrained_run(model: str, polarity: str | None, budget, create: bool = True) -> str:
    """The run id whose checkpoint a transfer of `model` starts from (trained here if missing).

    `polarity=None` takes the source run as it is. With `create=False` (search
    workers) a missing pretraining run is an error: the launcher makes it first.
    """
    tracking.init()
    client = MlflowClient()
    source = tracking.newest_final_runs(client, SOURCE_STEP).get(model)
    if source is not None and polarity in (None, source.data.params.get("polarity")):
        return source.info.run_id
    settings = _pretrain_settings(source, model)
    for key in ("device", "init_from", "freeze", "train_subset", "val_subset", "epochs"):
        settings.pop(key, None)  # a full-split run; its epochs come from the budget, like a final
    settings.update(
        polarity=polarity or settings.get("polarity", "keep"),
        patience=budget.final_patience,
        seed=budget.seed,
    )
    key = pretrain_key(
        {**settings, "final_images": budget.final_images, "final_epochs": budget.final_epochs}
    )
    experiment = tracking.experiment_id(PRETRAIN.name)
    found = client.search_runs(
        [experiment],
        f"tags.role = 'pretrain' AND tags.pretrain_key = '{key}' AND tags.state = 'COMPLETE'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    if not create:
        raise RuntimeError(
            f"no pretraining run for {model} (polarity {polarity}, key {key}); "
            "the study launcher creates it before its workers start"
        )
    return _pretrain(model, settings, key, source, budget)


def _pretrain(model: str, settings: dict[str, Any], key: str, source, budget) -> str:
    from experiments.runner import load_step_data, train_and_log
    from experiments.search import _train_images
    from experiments.train import TrainConfig

    data = load_step_data(PRETRAIN)
    settings["epochs"] = budget.retrain_epochs(_train_images(data))
    cfg = TrainConfig(model=model).with_overrides(
        {k: v for k, v in settings.items() if k != "model"}
    )
    origin = source.info.run_id if source is not None else "defaults"
    print(
        f"[{PRETRAIN.name}/{model}] pretraining on TRAIN with polarity {cfg.polarity} "
        f"(settings of {origin}), {cfg.epochs} epochs",
        flush=True,
    )
    outcome = train_and_log(
        data,
        cfg,
        run_name=f"pretrain-{model}-{cfg.polarity}",
        extra_tags={
            "role": "pretrain",
            "pretrain_key": key,
            "polarity": cfg.polarity,
            "settings_from": origin,
        },
    )
    return outcome.run_id


def fine_tune_base(
    model: str, polarity: str | None, budget, create: bool = False
) -> dict[str, Any]:
    """Overrides every fine-tune of `model` starts from: the pretrained weights, architecture,
    normalization and polarity, and the fixed fine-tuning optimiser."""
    from experiments.checkpoint import load_checkpoint

    run_id = pretrained_run(model, polarity, budget, create=create)
    checkpoint = load_checkpoint(run_id).checkpoint
    config = checkpoint["config"]
    return {
        **FINE_TUNE_FIXED,
        **checkpoint["model_kwargs"],
        **{key: config[key] for key in INHERITED},
        "init_from": run_id,
    }


def step_polarity(step: Step) -> str | None:
    """The polarity a transfer step fixes (None: the pretrained run's own)."""
    return step.fixed_settings.get("polarity")
