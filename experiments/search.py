"""Optuna studies: one per (step, model), every trial a nested MLflow run.

The search space is code, in one function: `suggest(trial, model_name)`.

Budget (multi-fidelity): each trial trains on a stratified subset of the
training split for a few epochs and reports validation accuracy per epoch to a
median pruner; the best COMPLETE trial's settings are then retrained on the
whole training split with early stopping (the `final` run). The objective and
every choice read only the validation split of the training set; evaluation
sets are scored after training, for the record.

MLflow layout, inside the step's experiment:
  study run   `study-<model>`   tags study/step/model/storage/budget; best params, best_val_acc, plots
    trial run `trial-<n>`       tags trial_number, state (COMPLETE / PRUNED / FAIL), role=trial
    final run `final`           the best trial retrained; tags best=true, role=final; model logged once
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import config, tracking, transfer
from experiments.runner import StepData, load_step_data, log_torch_model, train_and_log
from experiments.steps import get_step, training_step
from experiments.train import TrainConfig

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 15


class FixedSettings:
    """A trial whose `suggest_*` calls return the step's fixed settings instead of searching them."""

    def __init__(self, trial: optuna.Trial, fixed: dict[str, Any]):
        self._trial, self._fixed = trial, fixed

    def __getattr__(self, name: str):
        method = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return method
        return lambda key, *args, **kwargs: (
            self._fixed[key] if key in self._fixed else method(key, *args, **kwargs)
        )


def suggest(trial: optuna.Trial, model_name: str) -> dict[str, Any]:
    """Every searched setting of a trial, as flat `TrainConfig` overrides (logged unchanged)."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
        "optimizer": trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"]),
        "schedule": trial.suggest_categorical("schedule", ["cosine", "onecycle", "none"]),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.15),
        "normalization": trial.suggest_categorical(
            "normalization", ["none", "half", "dataset", "per_image"]
        ),
        "polarity": trial.suggest_categorical("polarity", ["keep", "to_black"]),
        "augmentation": trial.suggest_categorical("augmentation", ["none", "crop", "affine"]),
    }
    if params["augmentation"] == "crop":
        params["crop_scale"] = trial.suggest_float("crop_scale", 0.6, 0.95)
    elif params["augmentation"] == "affine":
        params["affine_strength"] = trial.suggest_float("affine_strength", 0.3, 1.0)
    if model_name == "vgg":
        params["width"] = trial.suggest_categorical("width", [8, 16, 24, 32])
        params["depth"] = trial.suggest_int("depth", 1, 2)
        params["hidden"] = trial.suggest_categorical("hidden", [64, 128, 256])
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    elif model_name == "resnet":
        params["width"] = trial.suggest_categorical("width", [8, 16, 24])
        params["blocks"] = trial.suggest_int("blocks", 1, 2)
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.4)
    elif model_name == "efficientnet":
        params["width_mult"] = trial.suggest_categorical("width_mult", [0.25, 0.5, 0.75])
        params["depth_mult"] = trial.suggest_categorical("depth_mult", [0.25, 0.5, 0.75])
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.4)
        params["drop_path"] = trial.suggest_float("drop_path", 0.0, 0.2)
    elif model_name == "hybrid":
        params["width"] = trial.suggest_categorical("width", [8, 16, 24])
        params["vgg_depth"] = trial.suggest_int("vgg_depth", 1, 2)
        params["res_blocks"] = trial.suggest_int("res_blocks", 1, 2)
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    else:
        raise ValueError(f"no search space for model {model_name!r}")
    return params


@dataclass
class Budget:
    """How much a study spends. Defaults fit `make reproduce` on a 2-core CPU.

    Epoch counts left at None follow from image budgets, so every study spends
    about the same compute whatever the size of its training set: a trial sees
    `trial_images` images (2..20 epochs), the final retrain `final_images`
    (3..30 epochs, early stopping on the full validation split).
    """

    trials: int = 5
    epochs: int | None = None  # per trial; None: from trial_images
    train_subset: int = 4000  # training images per trial (0: all)
    val_subset: int = 3000  # validation images scored per trial epoch (0: all)
    trial_images: int = 12_000
    final_epochs: int | None = (
        None  # the best trial retrained on the whole split; None: from final_images
    )
    final_images: int = 120_000
    final_patience: int = 2
    warmup_epochs: int = 1  # the pruner never prunes before this epoch
    score_trials: bool = False  # also score trials on the evaluation sets (analysis only)
    timeout: float | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # fixed overrides for every trial

    def trial_epochs(self, train_images: int) -> int:
        if self.epochs:
            return self.epochs
        seen = min(self.train_subset or train_images, train_images)
        return int(min(20, max(2, round(self.trial_images / seen))))

    def retrain_epochs(self, train_images: int) -> int:
        if self.final_epochs:
            return self.final_epochs
        return int(min(30, max(3, math.ceil(self.final_images / train_images))))

    def tags(self) -> dict[str, str]:
        return {f"budget.{k}": str(v) for k, v in vars(self).items() if k != "extra"}


def _train_images(data: StepData) -> int:
    """Images in the training part of the 80/20 split."""
    return round(len(data.train_set) * (1 - TrainConfig().val_fraction))


def study_name(step: str, model: str) -> str:
    return f"{step}/{model}"


def make_storage(url: str | None = None) -> optuna.storages.BaseStorage:
    """The journal file by default (several processes on one machine); an RDB by URL (several machines).

    An RDB storage runs heartbeats: a trial whose worker died is failed once its
    heartbeat is older than the grace period, and retried once with the same params.
    """
    target = config.study_storage(url)
    if "://" in target:
        return optuna.storages.RDBStorage(
            target,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=4 * HEARTBEAT_SECONDS,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(target)
    return optuna.storages.JournalStorage(backend)


def load_or_create_study(
    step: str, model: str, storage: optuna.storages.BaseStorage, budget: Budget
):
    return optuna.create_study(
        study_name=study_name(step, model),
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=budget.seed, n_startup_trials=min(3, budget.trials)
        ),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=budget.warmup_epochs),
        load_if_exists=True,
    )


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail trials whose process died: FAIL in Optuna, KILLED + `interrupted` in MLflow.

    RDB storage: only trials whose heartbeat expired (other machines' live
    workers are left alone). Journal storage has no heartbeats: every RUNNING
    trial is failed, so call this only when no other worker of the study is
    alive (the launcher does, before it starts workers).
    """
    if isinstance(study._storage, optuna.storages.RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        stale = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number not in before
        ]
    else:
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    client = MlflowClient()
    for trial in stale:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "state", "FAIL")
            client.set_tag(run_id, "interrupted", "true")
            client.set_terminated(run_id, status="KILLED")
    return [t.number for t in stale]


def ensure_parent_run(
    study: optuna.Study, step: str, model: str, storage_url: str, budget: Budget
) -> str:
    """The study's parent run, created once (before any trial) and remembered in the study."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        return run_id
    client = MlflowClient()
    tags = {
        "study": study.study_name,
        "step": step,
        "model": model,
        "role": "study",
        "storage": config.mask_secrets(storage_url),
        **budget.tags(),
        **tracking.environment_tags(),
    }
    run = client.create_run(tracking.experiment_id(step), run_name=f"study-{model}", tags=tags)
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def _config(
    model: str, budget: Budget, data: StepData, params: dict[str, Any], **fidelity: Any
) -> TrainConfig:
    """One place that layers a run's settings.

    pretrained base (transfer steps) < budget extras < searched params < step's fixed < fidelity.
    """
    base = {}
    if data.step.pretrain:
        polarity = transfer.step_polarity(data.step)
        base = transfer.fine_tune_base(model, polarity, budget)
    overrides = {**base, **budget.extra, **params, **data.step.fixed_settings, **fidelity}
    return TrainConfig(model=model).with_overrides(overrides)


def _suggest(trial: optuna.Trial, data: StepData, model: str) -> dict[str, Any]:
    """A trial's searched settings: the model's space, or the fine-tuning space of a transfer step."""
    fixed = FixedSettings(trial, data.step.fixed_settings)
    return transfer.suggest_fine_tune(fixed, model) if data.step.pretrain else suggest(fixed, model)


def _objective(data: StepData, model: str, parent_run_id: str, budget: Budget):
    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, data, model)
        cfg = _config(
            model,
            budget,
            data,
            params,
            epochs=params.get("epochs") or budget.trial_epochs(_train_images(data)),
            train_subset=budget.train_subset,
            val_subset=budget.val_subset,
            seed=budget.seed + trial.number,
        )

        def report(row: dict[str, float]) -> None:
            trial.report(row["val_acc"], int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {int(row['epoch'])}")

        outcome = train_and_log(
            data,
            cfg,
            run_name=f"trial-{trial.number}",
            parent_run_id=parent_run_id,
            extra_tags={
                "study": f"{data.step.name}/{model}",
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


def _transfer_tags(cfg: TrainConfig) -> dict[str, str]:
    return {"pretrained_run": cfg.init_from, "freeze": cfg.freeze} if cfg.init_from else {}


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial by validation accuracy (a pruned trial's value is only intermediate)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _progress_line(started: float):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        best = best_complete_trial(study)
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best_text = f"{best.value:.4f} (trial {best.number})" if best else "-"
        print(
            f"[{study.study_name}] trial {trial.number} {trial.state.name:<8} value {value} "
            f"best {best_text} elapsed {time.perf_counter() - started:.0f} s",
            flush=True,
        )

    return callback


@dataclass
class StudyResult:
    study_name: str
    parent_run_id: str
    best_trial: int
    best_params: dict[str, Any]
    best_val_acc: float
    final_run_id: str | None
    final_metrics: dict[str, float]


def prepare_study(step_name: str, model: str, budget: Budget, storage_url: str | None):
    """Create or load the study and its parent run, and fail trials left RUNNING by a dead process.

    Runs once in the launcher, before any worker starts, so that the database,
    the experiment, the study and the parent run are created by one process.
    """
    step = training_step(step_name)
    if step.name != get_step(step_name).name:
        print(f"{step_name} trains nothing: its cells come from the {step.name} study", flush=True)
    tracking.init()
    study = load_or_create_study(step.name, model, make_storage(storage_url), budget)
    stale = fail_stale_trials(study)
    if stale:
        print(f"[{study.study_name}] marked interrupted trials {stale} as FAIL", flush=True)
    parent = ensure_parent_run(study, step.name, model, config.study_storage(storage_url), budget)
    return step, study, parent


def optimize(
    study: optuna.Study, data: StepData, model: str, parent: str, budget: Budget, quota: int
) -> int:
    """Run trials in this process until it has added `quota` finished (COMPLETE or PRUNED) trials.

    A trial that raises is recorded FAIL (its run FAILED with `fail_reason`) and
    the study goes on; after `max(3, quota)` failures in a row something is
    wrong with every trial, and the error says so. Returns the trials added.
    """
    started = time.perf_counter()
    objective = _objective(data, model, parent, budget)
    added = failures = 0
    while added < quota:
        if budget.timeout is not None and time.perf_counter() - started > budget.timeout:
            print(f"[{study.study_name}] timeout reached after {added} trials", flush=True)
            break
        before = len(study.trials)
        study.optimize(
            objective, n_trials=1, catch=(Exception,), callbacks=[_progress_line(started)]
        )
        last = study.get_trials(deepcopy=False)[before:]
        if any(t.state in FINISHED for t in last):
            added += 1
            failures = 0
        else:
            failures += 1
            if failures >= max(3, quota):
                raise RuntimeError(
                    f"study {study.study_name}: {failures} trials failed in a row; "
                    "see the fail_reason tags of their runs in MLflow"
                )
    return added


def run_study(
    step_name: str,
    model: str,
    budget: Budget | None = None,
    storage_url: str | None = None,
    data: StepData | None = None,
    final: bool = True,
    workers: int = 1,
) -> StudyResult:
    """Run (or resume) the study of (step, model) until it holds `budget.trials` finished trials."""
    budget = budget or Budget()
    data = data or load_step_data(
        training_step(step_name)
    )  # bad data stops here: nothing logged yet
    if data.step.params_from:
        return retrain_from(data.step, model, budget, storage_url, data)
    step, study, parent = prepare_study(step_name, model, budget, storage_url)
    if step.pretrain:  # the pretrained model exists before any trial (workers only read it)
        pretrained = transfer.pretrained_run(model, transfer.step_polarity(step), budget)
        MlflowClient().set_tag(parent, "pretrained_run", pretrained)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = max(0, budget.trials - finished)
    print(f"[{study.study_name}] {finished} finished trials, running {remaining} more", flush=True)
    if remaining and workers > 1:
        run_workers(step.name, model, budget, storage_url, remaining, workers)
    elif remaining:
        optimize(study, data, model, parent, budget, remaining)
    return finish_study(study, step.name, model, parent, budget, data, final)


def retrain_from(
    step, model: str, budget: Budget, storage_url: str | None, data: StepData
) -> StudyResult:
    """A step without a search: retrain the best trial of `step.params_from` with `step.retrain`.

    The run is the step's `final` (tags study, role=final, best=true, params_from,
    retrain_of_trial); it is made once per source trial and found again after.
    """
    tracking.init()
    source_name = study_name(step.params_from, model)
    try:
        source = optuna.load_study(study_name=source_name, storage=make_storage(storage_url))
    except KeyError:
        raise RuntimeError(
            f"{step.name} retrains the best trial of {source_name}, which does not exist yet: "
            f"run `make {step.params_from} MODELS={model}` first"
        ) from None
    best = best_complete_trial(source)
    if best is None:
        raise RuntimeError(f"{source_name} has no COMPLETE trial to retrain")
    name = study_name(step.name, model)
    client = MlflowClient()
    found = client.search_runs(
        [tracking.experiment_id(step.name)],
        f"tags.study = '{name}' AND tags.role = 'final' AND tags.state = 'COMPLETE' "
        f"AND tags.retrain_of_trial = '{best.number}' AND tags.params_from = '{source_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        print(f"[{name}] already retrained: run {run.info.run_id}", flush=True)
        return StudyResult(
            name, "", best.number, best.params, best.value, run.info.run_id, run.data.metrics
        )
    cfg = _config(
        model,
        budget,
        data,
        best.params,
        **{"train_subset": 0, "val_subset": 0, "seed": budget.seed, **step.retrain_settings},
    )
    print(
        f"[{name}] retraining {source_name} trial {best.number}: "
        + ", ".join(f"{k}={v}" for k, v in step.retrain_settings.items()),
        flush=True,
    )
    outcome = _train_final(data, cfg, name, best.number, params_from=source_name)
    return StudyResult(
        name, "", best.number, best.params, best.value, outcome.run_id, outcome.metrics
    )


def run_workers(
    step: str, model: str, budget: Budget, storage_url: str | None, remaining: int, workers: int
) -> None:
    """Split `remaining` trials over `workers` processes sharing the study storage; wait for all."""
    workers = min(workers, remaining)
    threads = max(1, (os.cpu_count() or 1) // workers)
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # never override the parent
    if storage_url:
        env["OPTUNA_STORAGE"] = storage_url
    procs = []
    for index, quota in enumerate(quotas):
        command = [
            sys.executable, "-m", "experiments", "worker",
            "--step", step, "--model", model, "--quota", str(quota),
            "--threads", str(threads), "--index", str(index), "--budget", json.dumps(asdict(budget)),
        ]  # fmt: skip
        print(f"[{step}/{model}] worker {index}: {quota} trials, {threads} thread(s)", flush=True)
        procs.append(subprocess.Popen(command, env=env))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"study {step}/{model}: worker exit codes {codes}")


def worker_main(
    step_name: str, model: str, quota: int, threads: int, index: int, budget: Budget
) -> int:
    """One worker process: join the prepared study and add `quota` finished trials."""
    import torch

    torch.set_num_threads(threads)
    tracking.init()
    step = training_step(step_name)
    study = optuna.load_study(study_name=study_name(step.name, model), storage=make_storage())
    study.sampler = optuna.samplers.TPESampler(seed=budget.seed + 1000 * (index + 1))
    study.pruner = optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=budget.warmup_epochs
    )
    parent = study.user_attrs["mlflow_parent_run_id"]
    return optimize(study, load_step_data(step), model, parent, budget, quota)


def finish_study(
    study: optuna.Study,
    step: str,
    model: str,
    parent: str,
    budget: Budget,
    data: StepData | None,
    final: bool,
) -> StudyResult:
    """Tag the best trial, retrain it on the full split (once), fill the parent run."""
    best = best_complete_trial(study)
    if best is None:
        states = {t.number: t.state.name for t in study.trials}
        raise RuntimeError(
            f"study {study.study_name} has no COMPLETE trial ({states}); "
            "see the fail_reason tags of its trial runs in MLflow"
        )
    client = MlflowClient()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "best", "true" if trial.number == best.number else "false")
    final_run_id = study.user_attrs.get("final_run_id")
    final_metrics: dict[str, float] = {}
    if final and (final_run_id is None or study.user_attrs.get("final_of_trial") != best.number):
        final_run_id, final_metrics = _retrain_best(study, best, model, parent, budget, data)
    elif final_run_id:
        final_metrics = client.get_run(final_run_id).data.metrics
    _log_parent(study, best, parent)
    return StudyResult(
        study.study_name, parent, best.number, best.params, best.value, final_run_id, final_metrics
    )


def _retrain_best(study, best, model, parent, budget, data) -> tuple[str, dict[str, float]]:
    cfg = _config(
        model,
        budget,
        data,
        best.params,
        epochs=best.params.get("epochs") or budget.retrain_epochs(_train_images(data)),
        patience=budget.final_patience,
        train_subset=0,
        val_subset=0,
        seed=budget.seed,
    )
    print(
        f"[{study.study_name}] retraining trial {best.number} on the full training split",
        flush=True,
    )
    outcome = _train_final(data, cfg, study.study_name, best.number, parent)
    study.set_user_attr("final_run_id", outcome.run_id)
    study.set_user_attr("final_of_trial", best.number)
    return outcome.run_id, outcome.metrics


def _train_final(data, cfg, study: str, trial: int, parent: str | None = None, **tags: str):
    """The `final` run of a study: train, log tags that the report finds it by, log the model once."""
    outcome = train_and_log(
        data,
        cfg,
        run_name="final",
        parent_run_id=parent,
        extra_tags={
            "study": study,
            "role": "final",
            "best": "true",
            "retrain_of_trial": str(trial),
            **_transfer_tags(cfg),
            **tags,
        },
    )
    log_torch_model(outcome.run_id, outcome.result.model)
    return outcome


def _log_parent(study: optuna.Study, best: optuna.trial.FrozenTrial, parent: str) -> None:
    """Best params, best_val_acc, trial counts and Optuna's plots on the study's parent run."""
    client = MlflowClient()
    logged = client.get_run(parent).data.params
    if not any(key.startswith("best.") for key in logged):  # params are immutable: log them once
        client.log_batch(
            parent, params=[Param(f"best.{k}", str(v)) for k, v in best.params.items()]
        )
    for key, value in best.params.items():  # tags follow the best trial when a resume changes it
        client.set_tag(parent, f"best.{key}", str(value))
    client.log_metric(parent, "best_val_acc", best.value)
    for state in TrialState:
        count = len(study.get_trials(deepcopy=False, states=(state,)))
        client.log_metric(parent, f"trials_{state.name.lower()}", count)
    client.set_tag(parent, "best_trial", str(best.number))
    if study.user_attrs.get("final_run_id"):
        client.set_tag(parent, "final_run_id", study.user_attrs["final_run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        for path in _study_plots(study, Path(tmp)):
            client.log_artifact(parent, str(path), artifact_path="optuna")
    client.set_terminated(parent, status="FINISHED")


def _study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    written = []
    for name, plot in (
        ("optimization_history", oplt.plot_optimization_history),
        ("param_importances", oplt.plot_param_importances),
        ("parallel_coordinate", oplt.plot_parallel_coordinate),
        ("intermediate_values", oplt.plot_intermediate_values),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and small-sample notices
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=90)
            plt.close(figure)
            written.append(path)
        except Exception as exc:  # a plot needs more finished trials than a short study has
            print(
                f"[{study.study_name}] skipped plot {name}: {str(exc).splitlines()[0]}",
                file=sys.stderr,
            )
    return written


def default_budget(**changes: Any) -> Budget:
    budget = Budget()
    for key, value in changes.items():
        if value is not None:
            setattr(budget, key, value)
    if budget.trials < 1 or (budget.epochs is not None and budget.epochs < 1):
        raise ValueError("trials and epochs must be >= 1")
    if budget.timeout is not None and (math.isnan(budget.timeout) or budget.timeout <= 0):
        raise ValueError("timeout must be a positive number of seconds")
    return budget
