"""Every run's settings in a study, resolved once: trials, finals, baselines and their keys.

Each goes through `experiments.core.settings.resolve` (defaults < base < searched < role <
the step's fixed settings < the user's `--set`); `run_key` finds a final, a baseline or a
retrain again by its resolved settings and its data.
"""

from __future__ import annotations

from typing import Any

from experiments.core.settings import TrainConfig, check_user_against_fixed, coerce, resolve
from experiments.core.steps import Step
from experiments.search import transfer
from experiments.search.space import FINE_TUNE_DEFAULTS, Budget, Pinned, suggest, suggest_fine_tune
from experiments.training.checkpoint import load_checkpoint
from experiments.training.runner import StepData


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


def default_trial_params(step: Step, model: str, budget: Budget, base: dict[str, Any]) -> dict:
    """The searched params of the hand-set defaults (enqueued as trial 0 of every study)."""
    defaults = resolve(model, base=base).flat()
    recorder = _Defaults(defaults)
    suggest_fn = suggest_fine_tune if step.kind == "fine_tune" else suggest
    suggest_fn(Pinned(recorder, pinned(step, model, budget)), model)
    return recorder.params


def pinned(step: Step, model: str, budget: Budget) -> dict[str, Any]:
    """Settings a search does not vary: the step's fixed ones and the user's `--set` values."""
    fixed, user = coerce(model, step.fixed_settings), coerce(model, budget.overrides)
    check_user_against_fixed(step.name, fixed, user)
    return {**fixed, **user}


def train_images(data: StepData, model: str, budget: Budget) -> int:
    """The images a final of this study trains on, at the `val_fraction` the step or the user
    sets (the budget's epochs follow from it)."""
    return data.training_images(pinned(data.step, model, budget).get("val_fraction"))


def run_config(
    step: Step,
    model: str,
    budget: Budget,
    base: dict[str, Any],
    searched: dict[str, Any],
    role: dict[str, Any],
) -> TrainConfig:
    """One run's settings through the one resolver (see `experiments.core.settings`)."""
    return resolve(
        model,
        base=base,
        searched=searched,
        role=role,
        fixed=step.fixed_settings,
        user=budget.overrides,
        step=step.name,
    )


PRETRAINED = "pretrained run (found or made when the step runs)"


def check_settings(step: Step, model: str, budget: Budget) -> TrainConfig:
    """Resolve the step's fixed and the user's settings alone: a bad key or value, a `--set`
    that contradicts the step, or an `init_from` that is not a checkpoint of this model
    stops the command before any data, run or study is made."""
    base = {"init_from": PRETRAINED} if step.kind == "fine_tune" else {}
    cfg = run_config(step, model, budget, base, {}, step.settings_for(model))
    if cfg.init_from and cfg.init_from != PRETRAINED:
        source = load_checkpoint(cfg.init_from).checkpoint["model"]
        if source != model:
            raise ValueError(f"init_from {cfg.init_from}: a {source} checkpoint, not {model}")
    return cfg


def run_key(cfg: TrainConfig, data: StepData) -> str:
    """What finds a final, baseline or retrain again: its resolved settings and its data."""
    return transfer.pretrain_key({**cfg.flat(), "data": data.data_key})


def baseline_config(
    step: Step, model: str, budget: Budget, data: StepData, base: dict[str, Any]
) -> TrainConfig:
    """Trial 0's settings (the hand-set defaults as the search space holds them), as a final."""
    params = default_trial_params(step, model, budget, base)
    return run_config(
        step,
        model,
        budget,
        base,
        params,
        budget.final_role(params, train_images(data, model, budget)),
    )


def baseline_key(
    step: Step, model: str, budget: Budget, data: StepData, base: dict[str, Any]
) -> str:
    return run_key(baseline_config(step, model, budget, data, base), data)
