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

import sys
from typing import Any

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments.core.settings import TrainConfig
from experiments.core.steps import Step, get_step, training_step
from experiments.search import process, study
from experiments.search.plan import StudyPlan
from experiments.search.space import Budget, Pinned, suggest, suggest_fine_tune
from experiments.search.study import StudyResult, summary_line  # noqa: F401 (the driver's result)
from experiments.tracking import results, store
from experiments.training.runner import (
    RunOutcome,
    StepData,
    load_step_data,
    log_answer_tta,
    score_logged_run,
    train_and_log,
)


def _transfer_tags(cfg: TrainConfig) -> dict[str, str]:
    return {"pretrained_run": cfg.init_from, "freeze": cfg.freeze} if cfg.init_from else {}


def warm_start(handle: optuna.Study, plan: StudyPlan, parent: str) -> None:
    """Enqueue the best params of the related step's study (if it exists) as trial 1."""
    if plan.step.warm_start is None:
        return
    name = study.study_name(plan.step.warm_start, plan.model)
    try:
        source = optuna.load_study(study_name=name, storage=study.make_storage(plan.storage_url))
    except KeyError:
        return
    best = study.best_complete_trial(source)
    if best is None or best.user_attrs.get("defaults"):  # the defaults are trial 0 already
        return
    params = {k: v for k, v in best.params.items() if k not in plan.pinned}
    handle.enqueue_trial(params, user_attrs={"warm_start_from": f"{name}#{best.number}"})
    MlflowClient().set_tag(parent, "warm_start_from", f"{name} trial {best.number}")
    print(f"[{handle.study_name}] warm start: {name} trial {best.number} enqueued", flush=True)


def make_objective(plan: StudyPlan, parent: str):
    """A trial: suggest (pinned settings kept), resolve, train on the subset, report per epoch."""
    suggest_fn = suggest_fine_tune if plan.step.kind == "fine_tune" else suggest

    def objective(trial: optuna.Trial) -> float:
        params = suggest_fn(Pinned(trial, plan.pinned), plan.model)
        cfg = plan.trial(params, trial.number)

        def report(row: dict[str, float]) -> None:
            trial.report(row["val_acc"], int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {int(row['epoch'])}")

        outcome = train_and_log(
            plan.data,
            cfg,
            run_name=f"trial-{trial.number}",
            parent_run_id=parent,
            extra_tags={
                "study": plan.name,
                "trial_number": str(trial.number),
                "role": "trial",
                **_transfer_tags(cfg),
            },
            on_epoch=[report],
            log_figures=False,
            score=plan.budget.score_trials,
            on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
        )
        return outcome.result.best_val_acc

    return objective


def train_final(
    plan: StudyPlan,
    cfg: TrainConfig,
    trial: int | None,
    parent: str | None = None,
    **tags: str,
) -> RunOutcome:
    """The `final` run of a study: train, log tags that the report finds it by, log the model
    once. `trial`: the retrained trial's number (None: a recipe, no trial)."""
    outcome = train_and_log(
        plan.data,
        cfg,
        run_name="final",
        parent_run_id=parent,
        extra_tags={
            "study": plan.name,
            "role": "final",
            "best": "true",
            **({"retrain_of_trial": str(trial)} if trial is not None else {}),
            **_transfer_tags(cfg),
            **tags,
        },
        log_model=True,
        resumable=True,
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
    step = training_step(step_name)
    if step is not get_step(step_name):
        print(f"{step_name} trains nothing: its cells come from the {step.name} study", flush=True)
    # everything is checked before anything exists: settings, storage, then the data
    plan = StudyPlan.build(step, model, budget or Budget(), storage_url)
    study.check_storage(storage_url)
    plan = plan.with_data(data)
    if step.kind == "retrain":
        return retrain_best(plan)
    if step.kind == "recipe":
        return train_recipe(plan)
    return search_step(plan, final, workers)


def prepare_study(plan: StudyPlan) -> tuple[optuna.Study, str]:
    """Create or load the study and its parent run, and fail trials left RUNNING by a dead process.

    Runs once in the launcher, before any worker starts, so that the database,
    the experiment, the study and the parent run are created by one process.
    """
    if store.store_exists():  # reached (a server: answering) before the study is touched
        store.init()
    storage = study.make_storage(plan.storage_url)
    handle = study.load_or_create_study(plan.step.name, plan.model, storage, plan.budget)
    # a refused resume changes nothing: checked before any trial, run or parent is touched
    study.bind_store(handle, plan.storage_url)  # before a missing local database is created
    store.init()
    check_data(handle, plan.data)
    check_profile(handle, plan.budget)
    study.check_pinned(handle, plan.pinned)
    stale = study.fail_stale_trials(handle, plan.rdb)
    if stale:
        print(f"[{handle.study_name}] marked interrupted trials {stale} as FAIL", flush=True)
    orphans = [] if plan.rdb else end_orphans(plan.step, handle.study_name)
    if orphans:
        print(f"[{handle.study_name}] ended interrupted runs {orphans} as KILLED", flush=True)
    parent = study.ensure_parent_run(
        handle, plan.step.name, plan.model, plan.storage_at, plan.budget
    )
    return handle, parent


def end_orphans(step: Step, name: str) -> list[str]:
    """End the study's parent, `final` and `baseline` runs left RUNNING by a process that died.

    Called by the launcher before it starts anything, like `fail_stale_trials`, and
    only with the single-machine journal storage: then no other process of this
    study is alive (trials are handled there). With a shared RDB another machine's
    launcher may be running them, so they are left alone.
    """
    client = MlflowClient()
    ended = []
    for _, run in results.running(step.name, name).iterrows():
        if results.tag(run, "role") in ("final", "study", "baseline"):
            store.mark_interrupted(
                client, run["run_id"], results.last_logged(client, run["run_id"])
            )
            ended.append(f"{results.tag(run, 'role')} {run['run_id'][:8]}")
    return ended


def search_step(plan: StudyPlan, final: bool, workers: int) -> StudyResult:
    """A study until it holds `budget.trials` finished trials, then its best trial retrained;
    the study is held by this process throughout (`study.study_lock`)."""
    with study.study_lock(plan.name, plan.storage_url):
        handle, parent = prepare_study(plan)
        try:
            plan = study_base(handle, plan, parent)  # before any worker starts
            enqueue_starts(handle, plan, parent)
            finished = len(handle.get_trials(deepcopy=False, states=study.FINISHED))
            remaining = max(0, plan.budget.trials - finished)
            print(
                f"[{handle.study_name}] {finished} finished trials, running {remaining} more",
                flush=True,
            )
            if remaining and workers > 1:
                entry = [sys.executable, "-m", "experiments", "worker"]  # runs `worker_main`
                step, model = plan.step.name, plan.model
                study.spawn_workers(
                    entry, step, model, plan.budget, plan.storage_url, remaining, workers
                )
            elif remaining:
                study.optimize(handle, make_objective(plan, parent), remaining, plan.budget.timeout)
            return finish_study(handle, plan, parent, final)
        except BaseException as exc:
            study.end_parent(parent, exc)
            raise


def check_data(handle: optuna.Study, data: StepData) -> None:
    """A study's trials are comparable only on one training and validation set: a study is
    resumed on the data it started with, never on other data."""
    recorded = handle.user_attrs.get("data_key")
    if recorded is None and not handle.trials:
        handle.set_user_attr("data_key", data.data_key)
    elif recorded != data.data_key:
        known = f"data key {recorded}" if recorded else "a study from before data keys"
        raise ValueError(
            f"study {handle.study_name}: its trials were scored on other data ({known}, now "
            f"{data.data_key}); use another store (MLRUNS_DIR) or delete the study"
        )


def check_profile(handle: optuna.Study, budget: Budget) -> None:
    """A study's trials are comparable only at one budget profile (their subsets and epochs):
    a study started at one profile is never continued at another (`auto` differs by machine)."""
    # a study from before profiles ran at the one budget there was then: cpu's
    recorded = handle.user_attrs.get("budget_profile", "cpu" if handle.trials else None)
    if recorded is None:
        handle.set_user_attr("budget_profile", budget.profile)
    elif recorded != budget.profile:
        raise ValueError(
            f"study {handle.study_name}: its trials ran at the {recorded} budget profile, now "
            f"{budget.profile}; use --profile {recorded} (PROFILE={recorded}) or another store "
            "(MLRUNS_DIR)"
        )


def study_base(handle: optuna.Study, plan: StudyPlan, parent: str) -> StudyPlan:
    """The plan with the study's base settings; a fine-tune study keeps the pretrained run it
    started from."""
    pretrained = handle.user_attrs.get("pretrained_run")
    plan = plan.with_base(create=True, run_id=pretrained)
    if plan.base.get("init_from") and pretrained is None:
        handle.set_user_attr("pretrained_run", plan.base["init_from"])
        MlflowClient().set_tag(parent, "pretrained_run", plan.base["init_from"])
    return plan


def enqueue_starts(handle: optuna.Study, plan: StudyPlan, parent: str) -> None:
    """Trial 0 is the hand-set defaults, then the warm start; each enqueued again if a crash
    left it FAIL, so a resumed study never loses them."""
    alive = [t for t in handle.trials if t.state != TrialState.FAIL]
    if not any(t.user_attrs.get("defaults") for t in alive):
        handle.enqueue_trial(plan.defaults(), user_attrs={"defaults": True})
    if not any(t.user_attrs.get("warm_start_from") for t in alive):
        warm_start(handle, plan, parent)


def worker_main(
    step_name: str, model: str, quota: int, threads: int, index: int, budget: Budget
) -> int:
    """One worker process: join the prepared study and add `quota` finished trials."""
    process.die_with_launcher()
    torch.set_num_threads(threads)
    store.init()
    plan = StudyPlan.build(training_step(step_name), model, budget).with_data()
    handle = study.join_study(plan.step.name, model, budget, index)
    parent = handle.user_attrs["mlflow_parent_run_id"]
    plan = plan.with_base(False, handle.user_attrs.get("pretrained_run"))
    return study.optimize(handle, make_objective(plan, parent), quota, budget.timeout)


def finish_study(handle: optuna.Study, plan: StudyPlan, parent: str, final: bool) -> StudyResult:
    """Tag the best trial, retrain it on the full split (once), train the baseline (once),
    select the better of the two by validation accuracy, fill the parent run."""
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
    cfg = plan.final(best.params)
    key = plan.key(cfg)  # a new budget, seed, --set or data: a new final
    if final and (final_run_id is None or handle.user_attrs.get("final_key") != key):
        print(
            f"[{handle.study_name}] retraining trial {best.number} on the full training split",
            flush=True,
        )
        tags = {}
        if (
            plan.budget.baseline == "final"
            and best.user_attrs.get("defaults")
            and plan.key(plan.baseline()) == key
        ):
            tags = {"baseline_key": key, "also_baseline": "true"}  # trial 0 won: one run
        outcome = train_final(plan, cfg, best.number, parent, **tags)
        handle.set_user_attr("final_run_id", outcome.run_id)
        handle.set_user_attr("final_of_trial", best.number)
        handle.set_user_attr("final_key", key)
        final_run_id, final_metrics = outcome.run_id, outcome.metrics
    elif final_run_id:
        final_metrics = results.run_metrics(final_run_id)
    result = StudyResult(
        handle.study_name, parent, best.number, best.params, best.value, final_run_id, final_metrics
    )
    if final and final_run_id and plan.budget.baseline == "trial":
        chosen, baseline_metrics = compare_trials(handle, plan, parent, best, final_run_id)
    elif final and final_run_id:
        baseline_id, baseline_metrics = train_baseline(handle, plan, parent)
        chosen = select(handle, parent, final_run_id, final_metrics, baseline_id, baseline_metrics)
    if final and final_run_id:
        if plan.step.val_set is not None:  # a Task 2 champion candidate: its TTA views, once
            log_answer_tta(chosen, plan.data)
        result.answer(chosen, final_metrics if chosen == final_run_id else baseline_metrics)
    study.log_parent(handle, best, parent)
    return result


def compare_trials(
    handle: optuna.Study,
    plan: StudyPlan,
    parent: str,
    best: optuna.trial.FrozenTrial,
    final_id: str,
) -> tuple[str, dict[str, float]]:
    """The `trial` baseline: the searched settings against the hand-set defaults at one
    fidelity, the best trial against trial 0 (the same run when the defaults won), both
    scored on the evaluation sets for the record. No baseline is trained; the study's answer
    is its final (the best trial retrained). Returns the answer and trial 0's metrics."""
    defaults = next(
        (
            t
            for t in handle.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("defaults") and t.user_attrs.get("mlflow_run_id")
        ),
        None,
    )
    client = MlflowClient()
    tags = {"ab_fidelity": "trial", "selected_run": final_id, "selected_role": "final"}
    tags["final_run"] = final_id
    baseline_metrics: dict[str, float] = {}
    if defaults is not None and best.user_attrs.get("mlflow_run_id"):
        tags["ab_baseline_run"] = defaults.user_attrs["mlflow_run_id"]
        tags["ab_searched_run"] = best.user_attrs["mlflow_run_id"]
        baseline_metrics = score_logged_run(tags["ab_baseline_run"], plan.data)  # measuring only
        if tags["ab_searched_run"] != tags["ab_baseline_run"]:
            score_logged_run(tags["ab_searched_run"], plan.data)
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    earlier = results.runs(plan.step.name, model=plan.model, state=None, study=plan.name)
    for run_id in _answers(earlier) | {final_id}:  # one selected run per study
        client.set_tag(run_id, "selected", "true" if run_id == final_id else "false")
    handle.set_user_attr("selected_run_id", final_id)
    return final_id, baseline_metrics


def train_baseline(
    handle: optuna.Study, plan: StudyPlan, parent: str
) -> tuple[str, dict[str, float]]:
    """The hand-set defaults trained exactly like a final (`role=baseline`), once per settings
    and data: trial 0's settings (each default as the search space holds it, e.g. a weight
    decay of 0 at the range's lower bound), so that when trial 0 wins, final and baseline
    are one run (the final, tagged `also_baseline`)."""
    cfg = plan.baseline()
    key = plan.key(cfg)
    found = results.runs(plan.step.name, model=plan.model, role="baseline", baseline_key=key)
    if found.empty:  # the defaults trial won: its final is the baseline
        found = results.runs(plan.step.name, model=plan.model, role="final", baseline_key=key)
    if not found.empty:
        return found.iloc[0]["run_id"], results.metrics_of(found.iloc[0])
    print(f"[{handle.study_name}] training the baseline (hand-set defaults)", flush=True)
    outcome = train_and_log(
        plan.data,
        cfg,
        run_name="baseline",
        parent_run_id=parent,
        extra_tags={
            "study": handle.study_name,
            "role": "baseline",
            "baseline_key": key,
            **_transfer_tags(cfg),
        },
        log_model=True,
        resumable=True,
    )
    return outcome.run_id, outcome.metrics


def _answers(frame) -> set[str]:
    """Run ids of a study's earlier finals and baselines (candidates of an earlier selection)."""
    if frame.empty or "tags.role" not in frame:
        return set()
    return set(frame.loc[frame["tags.role"].isin(["final", "baseline"]), "run_id"])


def select(
    handle: optuna.Study,
    parent: str,
    final_id: str,
    final_metrics: dict[str, float],
    baseline_id: str,
    baseline_metrics: dict[str, float],
) -> str:
    """The study's model: the best trial's retrain or the baseline, whichever has the higher
    validation accuracy on the same full validation split (ties: the searched one).

    Reads validation only; evaluation sets are never consulted.
    """
    searched = final_metrics.get("best_val_acc", -1.0)
    defaults = baseline_metrics.get("best_val_acc", -1.0)
    chosen = final_id if searched >= defaults else baseline_id
    client = MlflowClient()
    step_name, model = handle.study_name.split("/", 1)
    earlier = results.runs(step_name, model=model, state=None, study=handle.study_name)
    for run_id in _answers(earlier) | {final_id, baseline_id}:  # one selected run per study
        client.set_tag(run_id, "selected", "true" if run_id == chosen else "false")
    client.set_tag(parent, "selected_run", chosen)
    client.set_tag(parent, "selected_role", "final" if chosen == final_id else "baseline")
    client.set_tag(parent, "baseline_run", baseline_id)
    client.set_tag(parent, "final_run", final_id)
    handle.set_user_attr("selected_run_id", chosen)
    print(
        f"[{handle.study_name}] selected the {'searched final' if chosen == final_id else 'baseline'}"
        f" (validation {max(searched, defaults):.4f}; final {searched:.4f}, baseline {defaults:.4f})",
        flush=True,
    )
    return chosen


def retrain_best(plan: StudyPlan) -> StudyResult:
    """A `retrain` step: the best trial of the source study retrained with the step's settings.

    The run is the step's `final` (tags study, role=final, best=true, params_from,
    retrain_of_trial); it is made once per source trial and found again after.
    """
    store.init()
    step = plan.step
    source_name = study.study_name(step.source, plan.model)
    storage = study.make_storage(plan.storage_url)
    try:
        source = optuna.load_study(study_name=source_name, storage=storage)
    except KeyError:
        raise RuntimeError(
            f"{step.name} retrains the best trial of {source_name}, which does not exist yet: "
            f"run `make {step.source} MODELS={plan.model}` first"
        ) from None
    study.bind_store(source, plan.storage_url, bind=False)  # the source's runs are in this store
    check_data(source, plan.data)  # the source's trials were scored on the data this step trains on
    best = study.best_complete_trial(source)
    if best is None:
        raise RuntimeError(f"{source_name} has no COMPLETE trial to retrain")
    if not plan.rdb:
        end_orphans(step, plan.name)
    role = {"train_subset": 0, "val_subset": 0, "seed": plan.budget.seed, **step.role_settings}
    cfg = plan.settings(best.params, role)
    what = f"retraining {source_name} trial {best.number}"
    run_id, metrics = final_once(plan, cfg, what, best.number, params_from=source_name)
    return StudyResult(
        plan.name,
        "",
        best.number,
        best.params,
        best.value,
        run_id,
        metrics,
        run_id,
        "final",
        metrics,
    )


def final_once(
    plan: StudyPlan, cfg: TrainConfig, what: str, trial: int | None, **tags: str
) -> tuple[str, dict[str, float]]:
    """A retrain's or a recipe's `final`, made once: found again by its resolved settings and
    data (`retrain_key`, and `tags`), else trained. Returns (run id, metrics)."""
    key = plan.key(cfg)  # other settings (a --set, a seed) or data: another run
    step, name = plan.step, plan.name
    found = results.runs(
        step.name, model=plan.model, role="final", study=name, retrain_key=key, **tags
    )
    if not found.empty:
        run = found.iloc[0]
        print(f"[{name}] already trained: run {run['run_id']}", flush=True)
        run_id, metrics = run["run_id"], results.metrics_of(run)
    else:
        flat = cfg.flat()  # model knobs included
        shown = ", ".join(f"{k}={flat[k]}" for k in step.settings_for(plan.model))  # as resolved
        print(f"[{name}] {what}: {shown}", flush=True)
        outcome = train_final(plan, cfg, trial, retrain_key=key, **tags)
        run_id, metrics = outcome.run_id, outcome.metrics
    if step.val_set is not None:  # the step's answer, a Task 2 champion candidate
        log_answer_tta(run_id, plan.data)
    return run_id, metrics


def train_recipe(plan: StudyPlan) -> StudyResult:
    """A `recipe` step: no search; the step's settings for `model` trained once on the whole
    split as the step's `final` (tag `recipe=true`), found again by its settings and data."""
    store.init()
    if not plan.rdb:  # with a shared RDB, another machine may be training it
        end_orphans(plan.step, plan.name)
    fixed = plan.step.settings_for(plan.model)
    role = {"train_subset": 0, "val_subset": 0, "seed": plan.budget.seed, **fixed}
    cfg = plan.settings({}, role)
    run_id, metrics = final_once(plan, cfg, "training the recipe", None, recipe="true")
    accuracy = metrics.get("best_val_acc", float("nan"))
    return StudyResult(plan.name, "", -1, {}, accuracy, run_id, metrics, run_id, "final", metrics)


def train_once(
    step_name: str, model: str, user: dict[str, Any], data_dir: str | None = None
) -> tuple[Step, RunOutcome]:
    """The `train` command: one run of `step_name` with its defaults, settings and the user's."""
    step = training_step(step_name)
    role = step.settings_for(model) if step.kind in ("retrain", "recipe") else {}
    plan = StudyPlan.build(step, model, Budget(overrides=user))
    plan = plan.with_data(load_step_data(step, data_dir)).with_base(create=True)
    if plan.base.get("init_from"):
        print(f"fine-tuning the pretrained run {plan.base['init_from']}")
    cfg = plan.settings({}, role)
    return step, train_and_log(plan.data, cfg, run_name=f"train-{cfg.model}", resumable=True)
