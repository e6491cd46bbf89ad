"""The driver: one dispatcher runs every kind of step, for `search`, `train` and the workers.

| kind        | `run_step` does                                                      |
|-------------|----------------------------------------------------------------------|
| `search`    | the study (trials), then its best trial retrained (`final`)          |
| `fine_tune` | the same, from the source step's model, in the fine-tuning space     |
| `retrain`   | the source study's best trial retrained with the step's settings     |
| `reuse`     | the source step's study (its runs hold this step's cells)            |

Every run's settings come from `settings.resolve` (defaults < base < searched
< role < the step's fixed settings < the user's `--set`). The objective and
every choice read only the validation split of the training set; evaluation
sets are scored after training, for the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
import torch
from mlflow.tracking import MlflowClient

from experiments import config, results, study, tracking, transfer
from experiments.checkpoint import load_checkpoint
from experiments.runner import RunOutcome, StepData, load_step_data, train_and_log
from experiments.settings import TrainConfig, check_user_against_fixed, coerce, resolve
from experiments.space import FINE_TUNE_DEFAULTS, Budget, Pinned, suggest, suggest_fine_tune
from experiments.steps import Step, get_step, training_step


@dataclass
class StudyResult:
    study_name: str
    parent_run_id: str
    best_trial: int
    best_params: dict[str, Any]
    best_val_acc: float
    final_run_id: str | None
    final_metrics: dict[str, float]


def base_settings(step: Step, model: str, budget: Budget, create: bool) -> dict[str, Any]:
    """What a run of `step` starts from before any search: a fine-tune's pretrained model."""
    if step.kind != "fine_tune":
        return {}
    return transfer.fine_tune_base(step, model, budget, create=create)


def pinned(step: Step, model: str, budget: Budget) -> dict[str, Any]:
    """Settings a search does not vary: the step's fixed ones and the user's `--set` values."""
    fixed, user = coerce(model, step.fixed_settings), coerce(model, budget.overrides)
    check_user_against_fixed(step.name, fixed, user)
    return {**fixed, **user}


def run_config(
    step: Step,
    model: str,
    budget: Budget,
    base: dict[str, Any],
    searched: dict[str, Any],
    role: dict[str, Any],
) -> TrainConfig:
    """One run's settings through the one resolver (see `experiments.settings`)."""
    return resolve(
        model,
        base=base,
        searched=searched,
        role=role,
        fixed=step.fixed_settings,
        user=budget.overrides,
        step=step.name,
    )


def check_settings(step: Step, model: str, budget: Budget) -> TrainConfig:
    """Resolve the step's fixed and the user's settings alone: a bad key or value, or a `--set`
    that contradicts the step, stops the command before any data, run or study is made."""
    cfg = run_config(step, model, budget, {}, {}, step.role_settings)
    if cfg.init_from:
        load_checkpoint(cfg.init_from)  # a file that is not a checkpoint stops here
    return cfg


def _transfer_tags(cfg: TrainConfig) -> dict[str, str]:
    return {"pretrained_run": cfg.init_from, "freeze": cfg.freeze} if cfg.init_from else {}


def make_objective(data: StepData, model: str, parent: str, budget: Budget, base: dict[str, Any]):
    """A trial: suggest (pinned settings kept), resolve, train on the subset, report per epoch."""
    suggest_fn = suggest_fine_tune if data.step.kind == "fine_tune" else suggest
    keep = pinned(data.step, model, budget)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_fn(Pinned(trial, keep), model)
        role = budget.trial_role(params, data.train_images, trial.number)
        cfg = run_config(data.step, model, budget, base, params, role)

        def report(row: dict[str, float]) -> None:
            trial.report(row["val_acc"], int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {int(row['epoch'])}")

        outcome = train_and_log(
            data,
            cfg,
            run_name=f"trial-{trial.number}",
            parent_run_id=parent,
            extra_tags={
                "study": study.study_name(data.step.name, model),
                "trial_number": str(trial.number),
                "role": "trial",
                **_transfer_tags(cfg),
            },
            on_epoch=[report],
            log_figures=False,
            score=budget.score_trials,
            on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
        )
        return outcome.result.best_val_acc

    return objective


def train_final(
    data: StepData, cfg: TrainConfig, name: str, trial: int, parent: str | None = None, **tags: str
) -> RunOutcome:
    """The `final` run of a study: train, log tags that the report finds it by, log the model once."""
    outcome = train_and_log(
        data,
        cfg,
        run_name="final",
        parent_run_id=parent,
        extra_tags={
            "study": name,
            "role": "final",
            "best": "true",
            "retrain_of_trial": str(trial),
            **_transfer_tags(cfg),
            **tags,
        },
        log_model=True,
    )
    return outcome


def run_step(
    step_name: str,
    model: str,
    budget: Budget | None = None,
    storage_url: str | None = None,
    data: StepData | None = None,
    final: bool = True,
    workers: int = 1,
) -> StudyResult:
    """Run (or resume) what step `step_name` declares for `model`; see the module's table."""
    budget = budget or Budget()
    step = training_step(step_name)
    if step is not get_step(step_name):
        print(f"{step_name} trains nothing: its cells come from the {step.name} study", flush=True)
    # everything is checked before anything exists: settings, storage, then the data
    check_settings(step, model, budget)
    study.check_storage(storage_url)
    data = data or load_step_data(step)
    if step.kind == "retrain":
        return retrain_best(step, model, budget, storage_url, data)
    return search_step(step, model, budget, storage_url, data, final, workers)


def prepare_study(step: Step, model: str, budget: Budget, storage_url: str | None):
    """Create or load the study and its parent run, and fail trials left RUNNING by a dead process.

    Runs once in the launcher, before any worker starts, so that the database,
    the experiment, the study and the parent run are created by one process.
    """
    tracking.init()
    handle = study.load_or_create_study(step.name, model, study.make_storage(storage_url), budget)
    stale = study.fail_stale_trials(handle, study.is_rdb(storage_url))
    if stale:
        print(f"[{handle.study_name}] marked interrupted trials {stale} as FAIL", flush=True)
    orphans = end_orphans(step, handle.study_name)
    if orphans:
        print(f"[{handle.study_name}] ended interrupted runs {orphans} as KILLED", flush=True)
    parent = study.ensure_parent_run(
        handle, step.name, model, config.study_storage(storage_url), budget
    )
    return handle, parent


def end_orphans(step: Step, name: str) -> list[str]:
    """End the study's `final` and parent runs left RUNNING by a process that died.

    Called by the launcher before it starts anything, like `fail_stale_trials`:
    no other process of this study is alive then (trials are handled there).
    """
    client = MlflowClient()
    ended = []
    for _, run in results.running(step.name, name).iterrows():
        if results.tag(run, "role") in ("final", "study"):
            tracking.mark_interrupted(client, run["run_id"])
            ended.append(f"{results.tag(run, 'role')} {run['run_id'][:8]}")
    return ended


def search_step(
    step: Step,
    model: str,
    budget: Budget,
    storage_url: str | None,
    data: StepData,
    final: bool,
    workers: int,
) -> StudyResult:
    """A study until it holds `budget.trials` finished trials, then its best trial retrained."""
    handle, parent = prepare_study(step, model, budget, storage_url)
    base = base_settings(step, model, budget, create=True)  # before any worker starts
    if base.get("init_from"):
        MlflowClient().set_tag(parent, "pretrained_run", base["init_from"])
    finished = len(handle.get_trials(deepcopy=False, states=study.FINISHED))
    remaining = max(0, budget.trials - finished)
    print(f"[{handle.study_name}] {finished} finished trials, running {remaining} more", flush=True)
    try:
        if remaining and workers > 1:
            study.spawn_workers(step.name, model, budget, storage_url, remaining, workers)
        elif remaining:
            objective = make_objective(data, model, parent, budget, base)
            study.optimize(handle, objective, remaining, budget.timeout)
        return finish_study(handle, step, model, parent, budget, data, base, final)
    except BaseException as exc:
        study.end_parent(parent, exc)
        raise


def worker_main(
    step_name: str, model: str, quota: int, threads: int, index: int, budget: Budget
) -> int:
    """One worker process: join the prepared study and add `quota` finished trials."""
    torch.set_num_threads(threads)
    tracking.init()
    step = training_step(step_name)
    handle = study.join_study(step.name, model, budget, index)
    parent = handle.user_attrs["mlflow_parent_run_id"]
    base = base_settings(step, model, budget, create=False)
    objective = make_objective(load_step_data(step), model, parent, budget, base)
    return study.optimize(handle, objective, quota, budget.timeout)


def finish_study(
    handle: optuna.Study,
    step: Step,
    model: str,
    parent: str,
    budget: Budget,
    data: StepData,
    base: dict[str, Any],
    final: bool,
) -> StudyResult:
    """Tag the best trial, retrain it on the full split (once), fill the parent run."""
    best = study.best_complete_trial(handle)
    if best is None:
        states = {t.number: t.state.name for t in handle.trials}
        raise RuntimeError(
            f"study {handle.study_name} has no COMPLETE trial ({states}); "
            "see the fail_reason tags of its trial runs in MLflow"
        )
    study.tag_best_trials(handle, best)
    final_run_id = handle.user_attrs.get("final_run_id")
    final_metrics: dict[str, float] = {}
    if final and (final_run_id is None or handle.user_attrs.get("final_of_trial") != best.number):
        role = budget.final_role(best.params, data.train_images)
        cfg = run_config(step, model, budget, base, best.params, role)
        print(
            f"[{handle.study_name}] retraining trial {best.number} on the full training split",
            flush=True,
        )
        outcome = train_final(data, cfg, handle.study_name, best.number, parent)
        handle.set_user_attr("final_run_id", outcome.run_id)
        handle.set_user_attr("final_of_trial", best.number)
        final_run_id, final_metrics = outcome.run_id, outcome.metrics
    elif final_run_id:
        final_metrics = results.run_metrics(final_run_id)
    study.log_parent(handle, best, parent)
    return StudyResult(
        handle.study_name, parent, best.number, best.params, best.value, final_run_id, final_metrics
    )


def retrain_best(
    step: Step, model: str, budget: Budget, storage_url: str | None, data: StepData
) -> StudyResult:
    """A `retrain` step: the best trial of the source study retrained with the step's settings.

    The run is the step's `final` (tags study, role=final, best=true, params_from,
    retrain_of_trial); it is made once per source trial and found again after.
    """
    tracking.init()
    source_name = study.study_name(step.source, model)
    try:
        source = optuna.load_study(study_name=source_name, storage=study.make_storage(storage_url))
    except KeyError:
        raise RuntimeError(
            f"{step.name} retrains the best trial of {source_name}, which does not exist yet: "
            f"run `make {step.source} MODELS={model}` first"
        ) from None
    best = study.best_complete_trial(source)
    if best is None:
        raise RuntimeError(f"{source_name} has no COMPLETE trial to retrain")
    name = study.study_name(step.name, model)
    end_orphans(step, name)
    found = results.runs(
        step.name,
        model=model,
        role="final",
        study=name,
        retrain_of_trial=str(best.number),
        params_from=source_name,
    )
    if not found.empty:
        run = found.iloc[0]
        print(f"[{name}] already retrained: run {run['run_id']}", flush=True)
        return StudyResult(
            name, "", best.number, best.params, best.value, run["run_id"], results.metrics_of(run)
        )
    role = {"train_subset": 0, "val_subset": 0, "seed": budget.seed, **step.role_settings}
    cfg = run_config(step, model, budget, {}, best.params, role)
    print(
        f"[{name}] retraining {source_name} trial {best.number}: "
        + ", ".join(f"{k}={v}" for k, v in step.role_settings.items()),
        flush=True,
    )
    outcome = train_final(data, cfg, name, best.number, params_from=source_name)
    return StudyResult(
        name, "", best.number, best.params, best.value, outcome.run_id, outcome.metrics
    )


def train_once(
    step_name: str, model: str, user: dict[str, Any], data_dir: str | None = None
) -> tuple[Step, RunOutcome]:
    """The `train` command: one run of `step_name` with its defaults, settings and the user's."""
    step = training_step(step_name)
    budget = Budget(overrides=user)
    role = step.role_settings if step.kind == "retrain" else {}
    check_settings(step, model, budget)
    data = load_step_data(step, data_dir)
    base: dict[str, Any] = {}
    if step.kind == "fine_tune":
        base = {**transfer.fine_tune_base(step, model, budget, create=True), **FINE_TUNE_DEFAULTS}
        print(f"fine-tuning the pretrained run {base['init_from']}")
    cfg = run_config(step, model, budget, base, {}, role)
    return step, train_and_log(data, cfg, run_name=f"train-{cfg.model}")
