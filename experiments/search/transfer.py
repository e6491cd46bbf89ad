"""Transfer for Task 2: start from a model trained on TRAIN, fine-tune it on TEST or TRAIN3.

The starting point of a `fine_tune` step is its source step's final run of the
same model (task1-step1: TRAIN only, its settings searched on TRAIN's
validation split). When the step fixes another polarity than that run used (or
no such run exists yet), a dedicated pretraining run is trained once on TRAIN
with the same settings and that polarity, logged in the `task2-pretrain`
experiment, and found again by a key of its settings.

The fine-tune keeps the pretrained architecture and normalization
(`fine_tune_base`); the search chooses the fine-tuning learning rate, which
layers are frozen, the epochs and the augmentation (`space.suggest_fine_tune`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from experiments.core.settings import TrainConfig, resolve
from experiments.core.steps import PRETRAIN, Step
from experiments.search.space import FINE_TUNE_FIXED, Budget
from experiments.tracking import results
from experiments.training.checkpoint import load_checkpoint
from experiments.training.runner import load_step_data, train_and_log

# what a pretrained checkpoint decides for its fine-tunes (the rest is the fine-tune's own)
INHERITED = ("normalization", "polarity")
NOT_INHERITED = ("device", "init_from", "freeze", "train_subset", "val_subset", "epochs", "model")


def pretrain_key(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_polarity(step: Step) -> str | None:
    """The polarity a fine-tune step fixes (None: the pretrained run's own)."""
    return step.fixed_settings.get("polarity")


def pretrained_run(step: Step, model: str, budget: Budget, create: bool = True) -> str:
    """The run id whose checkpoint a fine-tune of `model` starts from (trained here if missing).

    With `create=False` (search workers) a missing pretraining run is an error:
    the launcher makes it first.
    """
    polarity = step_polarity(step)
    source = results.final_run(step.source, model)
    if source is not None and polarity in (None, source.get("params.polarity")):
        return source["run_id"]
    settings = (
        dict(load_checkpoint(source["run_id"]).checkpoint["config"])
        if source is not None
        else TrainConfig(model=model).flat()
    )
    for key in NOT_INHERITED:
        settings.pop(key, None)  # a full-split run; its epochs come from the budget, like a final
    settings.pop("patience", None)  # like a final's: from the budget
    settings.update(polarity=polarity or settings.get("polarity", "keep"), seed=budget.seed)
    scale = budget.final_epoch_scale.get(model, 1.0)
    key = pretrain_key(
        {
            **settings,
            "final_images": budget.final_images,
            "final_epochs": budget.final_epochs,
            "final_patience": budget.final_patience,
            # named only where it changes the epochs, so that the keys of the runs before it hold
            **({"final_epoch_scale": scale} if scale != 1.0 else {}),
        }
    )
    found = results.runs(PRETRAIN.name, role="pretrain", pretrain_key=key)
    if not found.empty:
        return found.iloc[0]["run_id"]
    if not create:
        raise RuntimeError(
            f"no pretraining run for {model} (polarity {polarity}, key {key}); "
            "the study launcher creates it before its workers start"
        )
    origin = source["run_id"] if source is not None else "defaults"
    return _pretrain(model, settings, key, origin, budget)


def _pretrain(model: str, settings: dict[str, Any], key: str, origin: str, budget: Budget) -> str:
    data = load_step_data(PRETRAIN)
    cfg = resolve(model, base=settings, role=budget.final_role({}, data.train_images, model))
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
        resumable=True,
    )
    return outcome.run_id


def fine_tune_base(
    step: Step, model: str, budget: Budget, create: bool = False, run_id: str | None = None
) -> dict[str, Any]:
    """The base settings of every fine-tune of `model`: the pretrained weights (`run_id`, else
    found or made), architecture, normalization and polarity, and the fixed fine-tuning optimiser."""
    run_id = run_id or pretrained_run(step, model, budget, create=create)
    checkpoint = load_checkpoint(run_id).checkpoint
    config = checkpoint["config"]
    return {
        **FINE_TUNE_FIXED,
        **checkpoint["model_kwargs"],
        **{key: config[key] for key in INHERITED},
        "init_from": run_id,
    }
