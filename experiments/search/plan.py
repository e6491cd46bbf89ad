"""A study's plan, resolved once and passed down to everything that runs the study.

`StudyPlan.build(step, model, budget, storage_url)` checks the step's fixed settings and the
user's `--set` values against each other and against the model, then holds what every part
of a study reads: the pinned settings (fixed by the step or the user, never searched), the
storage URL as given (`storage_at`: where it resolves), the training data and the
training-set size the budget's epochs follow from, the base a fine-tune starts from, and
the settings of each role (trial, final, baseline), each through the one resolver
(`experiments.core.settings.resolve`). The user's `--set` values are `budget.overrides`,
kept apart from the budget's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from experiments.core import config
from experiments.core.settings import TrainConfig, coerce, resolve
from experiments.core.steps import Step
from experiments.search import transfer
from experiments.search.space import FINE_TUNE_DEFAULTS, Budget, Pinned, suggest, suggest_fine_tune
from experiments.search.study import is_rdb, study_name
from experiments.training.checkpoint import load_checkpoint
from experiments.training.runner import StepData, load_step_data


def base_settings(
    step: Step, model: str, budget: Budget, create: bool, run_id: str | None = None
) -> dict[str, Any]:
    """What a run of `step` starts from before any search: a fine-tune's pretrained model
    (`run_id`, else found or made) and the fine-tunes' hand-set defaults (every one of which a
    fine-tuning trial searches)."""
    if step.kind != "fine_tune":
        return {}
    pretrained = transfer.fine_tune_base(step, model, budget, create=create, run_id=run_id)
    return {**pretrained, **FINE_TUNE_DEFAULTS}


class _Defaults:
    """A stand-in trial whose `suggest_*` calls answer the hand-set default of each setting."""

    def __init__(self, defaults: dict[str, Any]):
        self.defaults, self.params = defaults, {}

    def _answer(self, name: str, low=None, high=None, choices=None, **_: Any) -> Any:
        value = self.defaults[name]
        if choices is not None and value not in choices:
            value = choices[0]
        if low is not None:  # a default outside the searched range: its nearest bound
            value = min(max(value, low), high)
        self.params[name] = value
        return value

    def suggest_float(self, name, low, high, **kwargs):
        return self._answer(name, low, high)

    def suggest_int(self, name, low, high, **kwargs):
        return self._answer(name, low, high)

    def suggest_categorical(self, name, choices):
        return self._answer(name, choices=list(choices))


def default_params(step: Step, model: str, base: dict[str, Any], pinned: dict[str, Any]) -> dict:
    """The searched params of the hand-set defaults (enqueued as trial 0 of every study),
    `pinned` settings left out as a trial leaves them."""
    defaults = resolve(model, base=base).flat()
    recorder = _Defaults(defaults)
    suggest_fn = suggest_fine_tune if step.kind == "fine_tune" else suggest
    suggest_fn(Pinned(recorder, pinned), model)
    return recorder.params


PRETRAINED = "pretrained run (found or made when the step runs)"


def check_settings(step: Step, model: str, user: dict[str, Any]) -> TrainConfig:
    """Resolve the step's fixed and the user's settings (`--set`) alone: a bad key or value, a
    `--set` that contradicts the step, or an `init_from` that is not a checkpoint of this
    model stops the command before any data, run or study is made."""
    base = {"init_from": PRETRAINED} if step.kind == "fine_tune" else {}
    cfg = resolve(
        model,
        base=base,
        role=step.settings_for(model),
        fixed=step.fixed_settings,
        user=user,
        step=step.name,
    )
    if cfg.init_from and cfg.init_from != PRETRAINED:
        source = load_checkpoint(cfg.init_from).checkpoint["model"]
        if source != model:
            raise ValueError(f"init_from {cfg.init_from}: a {source} checkpoint, not {model}")
    return cfg


def run_key(cfg: TrainConfig, data: StepData) -> str:
    """What finds a final, baseline or retrain again: its resolved settings and its data."""
    return transfer.pretrain_key({**cfg.flat(), "data": data.data_key})


@dataclass(frozen=True)
class StudyPlan:
    """One (step, model) study: its budget, storage, data and every run's settings."""

    step: Step
    model: str
    budget: Budget
    storage_url: str | None = None  # the user's (None: OPTUNA_STORAGE, else the project's journal)
    pinned: dict[str, Any] = field(default_factory=dict)  # the step's fixed and the user's
    data: StepData | None = None
    train_images: int = 0  # the images a final trains on (0 until the data are loaded)
    base: dict[str, Any] = field(default_factory=dict)  # a fine-tune's pretrained settings

    @classmethod
    def build(
        cls, step: Step, model: str, budget: Budget, storage_url: str | None = None
    ) -> StudyPlan:
        """The plan before any data, store or study exists: a bad key or value, a `--set`
        that contradicts the step, or a pretrained run of another model stops it here."""
        check_settings(step, model, budget.overrides)  # the resolver checks user against fixed
        fixed, user = coerce(model, step.fixed_settings), coerce(model, budget.overrides)
        return cls(step, model, budget, storage_url, {**fixed, **user})

    def with_data(self, data: StepData | None = None) -> StudyPlan:
        """The plan with its training data (loaded when not given) and their final size, at
        the validation fraction the step or the user pins."""
        data = data or load_step_data(self.step)
        images = data.training_images(self.pinned.get("val_fraction"))
        return replace(self, data=data, train_images=images)

    def with_base(self, create: bool, run_id: str | None = None) -> StudyPlan:
        """The plan with what a fine-tune starts from: its pretrained run, found, or made when
        `create` (a worker only finds the run its launcher made)."""
        return replace(self, base=base_settings(self.step, self.model, self.budget, create, run_id))

    @property
    def name(self) -> str:
        return study_name(self.step.name, self.model)

    @property
    def rdb(self) -> bool:
        """True when the study storage is a database shared with other machines."""
        return is_rdb(self.storage_url)

    @property
    def storage_at(self) -> str:
        """Where the study storage is: the URL given, else OPTUNA_STORAGE, else the journal
        (unmasked: mask it with `config.mask_secrets` before showing it)."""
        return config.study_storage(self.storage_url)

    def settings(self, searched: dict[str, Any], role: dict[str, Any]) -> TrainConfig:
        """One run's settings: defaults < base < searched < role < fixed < the user's."""
        return resolve(
            self.model,
            base=self.base,
            searched=searched,
            role=role,
            fixed=self.step.fixed_settings,
            user=self.budget.overrides,
            step=self.step.name,
        )

    def trial(self, params: dict[str, Any], number: int) -> TrainConfig:
        """A trial's settings: its subset, epochs and seed at the budget's trial fidelity."""
        return self.settings(params, self.budget.trial_role(params, self.train_images, number))

    def final(self, params: dict[str, Any]) -> TrainConfig:
        """A final's settings: `params` on the whole split for the budget's final epochs."""
        return self.settings(params, self.budget.final_role(params, self.train_images, self.model))

    def defaults(self) -> dict[str, Any]:
        """The searched params of the hand-set defaults (trial 0 of every study)."""
        return default_params(self.step, self.model, self.base, self.pinned)

    def baseline(self) -> TrainConfig:
        """Trial 0's settings (the hand-set defaults as the search space holds them), as a final."""
        return self.final(self.defaults())

    def key(self, cfg: TrainConfig) -> str:
        """What finds a final, a baseline or a retrain again: its settings and its data."""
        return run_key(cfg, self.data)
