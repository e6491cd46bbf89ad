"""The search space and the budget of a study.

The search space is code, in two functions: `suggest(trial, model)` for the
studies that train from scratch, `suggest_fine_tune(trial, model)` for the
fine-tuning steps. Choice lists come from the registries (optimizers,
schedules, polarities, normalizations, augmentations, freezing) and each
model's own knobs from its `SEARCH_SPACE` (models/). Settings that the step
fixes or the user sets (`--set`) are not searched: `Pinned` answers their
`suggest_*` calls with the pinned value.

Budget (multi-fidelity): each trial trains on a stratified subset of the
training split for a few epochs and reports validation accuracy per epoch to a
median pruner; the best COMPLETE trial's settings are then retrained on the
whole training split with early stopping (the `final` run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from experiments.core.preprocess import NORMALIZATIONS, POLARITIES, SEARCHED_AUGMENTATIONS
from experiments.core.settings import FREEZE, OPTIMIZERS, SCHEDULES, resolve_device
from models import MODELS, search_space

BATCH_SIZES = (64, 128, 256)
# the fine-tunes' fixed optimiser and their defaults when nothing is searched (`train`)
FINE_TUNE_FIXED = {"optimizer": "adam", "schedule": "cosine", "batch_size": 64, "weight_decay": 0.0}
FINE_TUNE_DEFAULTS = {"lr": 1e-3, "freeze": "none", "epochs": 10, "augmentation": "affine"}


class Pinned:
    """A trial whose `suggest_*` calls return pinned values instead of searching them."""

    def __init__(self, trial: optuna.Trial, pinned: dict[str, Any]):
        self._trial, self._pinned = trial, pinned

    def __getattr__(self, name: str):
        method = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return method
        return lambda key, *args, **kwargs: (
            self._pinned[key] if key in self._pinned else method(key, *args, **kwargs)
        )


def _augmentation(trial: optuna.Trial, params: dict[str, Any], choices: list[str]) -> None:
    params["augmentation"] = trial.suggest_categorical("augmentation", choices)
    if params["augmentation"] == "crop":
        params["crop_scale"] = trial.suggest_float("crop_scale", 0.6, 0.95)
    elif params["augmentation"] == "affine":
        params["affine_strength"] = trial.suggest_float("affine_strength", 0.3, 1.0)


def suggest_model(trial: optuna.Trial, model_name: str) -> dict[str, Any]:
    """The model's own knobs, as its `SEARCH_SPACE` declares them."""
    params: dict[str, Any] = {}
    for knob, (kind, *spec) in search_space(model_name).items():
        if kind == "categorical":
            params[knob] = trial.suggest_categorical(knob, list(spec[0]))
        elif kind == "int":
            params[knob] = trial.suggest_int(knob, *spec)
        else:
            params[knob] = trial.suggest_float(knob, *spec)
    return params


def suggest(trial: optuna.Trial, model_name: str) -> dict[str, Any]:
    """Every searched setting of a trial, as flat settings (logged unchanged)."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "schedule": trial.suggest_categorical("schedule", list(SCHEDULES)),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.15),
        "normalization": trial.suggest_categorical("normalization", list(NORMALIZATIONS)),
        "polarity": trial.suggest_categorical("polarity", list(POLARITIES)),
    }
    _augmentation(trial, params, list(SEARCHED_AUGMENTATIONS))
    params.update(suggest_model(trial, model_name))
    return params


def suggest_fine_tune(trial: optuna.Trial, model_name: str) -> dict[str, Any]:
    """The searched settings of a fine-tuning trial; the architecture comes from the pretrained run."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "freeze": trial.suggest_categorical("freeze", list(FREEZE)),
        "epochs": trial.suggest_int("epochs", 3, 12),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.1),
    }
    # a random crop cuts strokes off glyphs the pretrained model already knows whole
    _augmentation(trial, params, [a for a in SEARCHED_AUGMENTATIONS if a != "crop"])
    return params


@dataclass
class Budget:
    """How much a study spends. Defaults fit `make reproduce` on a 2-core CPU.

    Epoch counts left at None follow from image budgets, so every study spends
    about the same compute whatever the size of its training set: a trial sees
    `trial_images` images (2..20 epochs), the final retrain about `final_images`
    (whole epochs rounded up to the budget, `final_min_epochs`..`final_max_epochs`, the whole cosine schedule, the epoch with the
    best validation loss restored: no early stopping cuts a final short).
    `overrides` are the user's `--set` values: fixed for every run of the study.
    """

    profile: str = "cpu"  # which PROFILES entry the defaults came from (logged as a tag)
    trials: int = 5
    epochs: int | None = None  # per trial; None: from trial_images
    train_subset: int = 4000  # training images per trial (0: all)
    val_subset: int = 3000  # validation images scored per trial epoch (0: all)
    trial_images: int = 6_000  # half of 12,000: the same rank correlation in reports/bench.md
    final_epochs: int | None = None  # the best trial retrained; None: from final_images
    final_images: int = 80_000
    final_max_epochs: int = 30
    final_min_epochs: int = 1
    # per model, a factor on its final's epochs (then capped at final_max_epochs): a model
    # whose epoch costs a fraction of another's trains more epochs in about the same time
    final_epoch_scale: dict[str, float] = field(default_factory=dict)
    # None: a final trains its whole schedule (fixed-length cosine) and keeps its best
    # validation epoch; an integer brings back early stopping with that patience
    final_patience: int | None = None
    warmup_epochs: int = 1  # the pruner never prunes before this epoch
    # how the searched answer is compared with the hand-set defaults: "final" trains the
    # defaults like a final (a `baseline` run; the answer is the better of the two on
    # validation), "trial" compares trial 0 (the defaults) with the best trial at trial
    # fidelity and trains no baseline (the answer is the best trial retrained)
    baseline: str = "final"
    score_trials: bool = False  # also score trials on the evaluation sets (analysis only)
    timeout: float | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"--profile {self.profile}: expected one of {', '.join(PROFILES)}")
        if self.trials < 1:
            raise ValueError(f"--trials {self.trials}: expected an integer >= 1")
        for name in ("epochs", "final_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")
        for name in ("train_subset", "val_subset", "seed", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= 0")
        if self.baseline not in ("final", "trial"):
            raise ValueError(f"baseline={self.baseline}: expected final or trial")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"--timeout {self.timeout}: expected a positive number of seconds")
        for model, factor in self.final_epoch_scale.items():
            if model not in MODELS or not (math.isfinite(factor) and factor > 0):
                raise ValueError(
                    f"final_epoch_scale {model}={factor}: expected a model of "
                    f"{', '.join(MODELS)} and a positive factor"
                )

    def trial_epochs(self, train_images: int) -> int:
        if self.epochs:
            return self.epochs
        seen = min(self.train_subset or train_images, train_images)
        return int(min(20, max(2, round(self.trial_images / seen))))

    def retrain_epochs(self, train_images: int, model: str | None = None) -> int:
        if self.final_epochs:
            return self.final_epochs
        epochs = math.ceil(self.final_images / train_images - 1e-9)  # whole epochs, rounded up
        epochs = math.ceil(epochs * self.final_epoch_scale.get(model, 1.0) - 1e-9)
        return int(min(self.final_max_epochs, max(self.final_min_epochs, epochs)))

    def trial_role(self, params: dict[str, Any], train_images: int, number: int) -> dict[str, Any]:
        """What the trial's fidelity fixes: its subset, its epochs and its seed."""
        return {
            "epochs": params.get("epochs") or self.trial_epochs(train_images),
            "train_subset": self.train_subset,
            "val_subset": self.val_subset,
            "seed": self.seed + number,
        }

    def final_role(
        self, params: dict[str, Any], train_images: int, model: str | None = None
    ) -> dict[str, Any]:
        """What a final retrain of `model` fixes: the whole split, its epochs, patience and
        seed."""
        epochs = params.get("epochs") or self.retrain_epochs(train_images, model)
        return {
            "epochs": epochs,
            "patience": self.final_patience or epochs,
            "train_subset": 0,
            "val_subset": 0,
            "seed": self.seed,
        }

    def tags(self) -> dict[str, str]:
        return {f"budget.{k}": str(v) for k, v in vars(self).items() if k != "overrides"}


# Named defaults. `cpu` is the dataclass above (comparing the search with the defaults at
# trial fidelity: no baseline run), sized for `make reproduce` on a 2-core CPU
# (docs/reproduce.md, "Operating points", gives its measured wall time). `gpu` spends about
# 5x the images per study (twice the trials, each 6x longer, on 3x larger subsets, scored on
# the whole validation split; finals of at least 300k images, 11 epochs of TRAIN);
# docs/reproduce.md, "On a GPU", says what one H200 measured of it.
# `quick` runs the whole pipeline (every step, model, report) at a smoke-test budget; `full`
# aims at the quality goals (11 epochs of TRAIN per final, where VGG's TEST black half
# reaches its target, 33 for EfficientNet; `make reproduce PROFILE=full` also adds 2 seeds
# to every answer).
# docs/reproduce.md has each profile's measured row, reports/full/ the report of `full`'s.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "trials": 2,
        "train_subset": 1_000,
        "val_subset": 600,
        "trial_images": 2_000,
        "final_epochs": 1,
        "warmup_epochs": 0,
        "baseline": "trial",
    },
    "cpu": {"baseline": "trial"},
    "full": {
        "trials": 10,
        "train_subset": 8_000,
        "val_subset": 0,
        "trial_images": 16_000,
        "final_images": 300_000,
        "final_max_epochs": 40,
        # an EfficientNet epoch costs about a third of a VGG one on a CPU: its finals train 3x
        # the epochs (33 of TRAIN, 18 of TRAIN2) in about a VGG final's time (CHANGELOG.md)
        "final_epoch_scale": {"efficientnet": 3},
    },
    "gpu": {
        "trials": 10,
        "train_subset": 12_000,
        "val_subset": 0,
        "trial_images": 36_000,
        "final_images": 300_000,
        "final_max_epochs": 40,
        "baseline": "trial",
    },
}


def resolve_profile(profile: str | None = "auto", device: str | None = None) -> str:
    """`auto` (or None): `gpu` where the run's device (`resolve_device`) is CUDA, else `cpu`;
    a named profile is taken as given."""
    if profile in (None, "auto"):
        return "gpu" if resolve_device(device or "auto").type == "cuda" else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile}: expected auto or one of {', '.join(PROFILES)}")
    return profile


def default_budget(profile: str | None = "auto", **changes: Any) -> Budget:
    """The profile's budget (`auto`: by the machine) with the given (non-None) changes, validated."""
    given = {k: v for k, v in changes.items() if v is not None}
    name = resolve_profile(profile, (given.get("overrides") or {}).get("device"))
    return Budget(profile=name, **{**PROFILES[name], **given})
