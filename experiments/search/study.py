"""Study mechanics: storage, stale trials, the parent run, the trial loop and worker processes.

Everything here goes through Optuna's public API. What a trial does (its
objective) is the driver's business (`experiments.search.driver`); this module only
runs trials, keeps the MLflow parent run of each study and logs its summary.

MLflow layout, inside the step's experiment:
  study run   `study-<model>`   tags study/step/model/storage/budget; best params, best_val_acc, plots
    trial run `trial-<n>`       tags trial_number, state (COMPLETE / PRUNED / FAIL), role=trial
    final run `final`           the best trial retrained; tags best=true, role=final
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
from mlflow.entities import Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from experiments.core import config  # noqa: E402
from experiments.search.process import (  # noqa: E402, F401 (the study's process)
    is_rdb,
    quiet_interrupts,
    spawn_workers,
    study_lock,
)
from experiments.search.space import Budget  # noqa: E402
from experiments.tracking import results, store

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 15
CONNECT_TIMEOUT = 5  # seconds before an unreachable database is an error


@dataclass
class StudyResult:
    """What a step produced. `answer_*` is the step's answer, the run its study selected: the
    final (the best trial retrained) or the baseline (the hand-set defaults), whichever has the
    higher validation accuracy; a retrain's or a recipe's final; None without a final."""

    study_name: str
    parent_run_id: str
    best_trial: int
    best_params: dict[str, Any]
    best_val_acc: float
    final_run_id: str | None
    final_metrics: dict[str, float]
    answer_run_id: str | None = None
    answer_role: str | None = None  # "final" or "baseline"
    answer_metrics: dict[str, float] = field(default_factory=dict)

    def answer(self, run_id: str, metrics: dict[str, float]) -> None:
        """Record the selected run: the final, or else the baseline."""
        self.answer_run_id = run_id
        self.answer_role = "final" if run_id == self.final_run_id else "baseline"
        self.answer_metrics = dict(metrics)

    @property
    def answer_val_acc(self) -> float | None:
        """The answer's validation accuracy on the full validation split."""
        return self.answer_metrics.get("best_val_acc")


def summary_line(result: StudyResult) -> str:
    """The one line a command prints for a finished step: the search's best trial, then the
    answer (the selected run, by role) and its accuracies."""
    chosen = "no search" if result.best_trial < 0 else f"best trial {result.best_trial}"
    head = f"[{result.study_name}] {chosen} val acc {result.best_val_acc:.4f}"
    if result.answer_run_id is None:
        return f"{head}; no final run"
    metrics = result.answer_metrics
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_acc") and k != "best_val_acc"
    )
    val = f" val acc {metrics['best_val_acc']:.4f}" if "best_val_acc" in metrics else ""
    return f"{head}; answer: {result.answer_role} run {result.answer_run_id}{val}: {shown}"


def study_name(step: str, model: str) -> str:
    return f"{step}/{model}"


def make_storage(url: str | None = None) -> optuna.storages.BaseStorage:
    """The journal file by default (several processes on one machine); an RDB by URL (several machines).

    An RDB storage runs heartbeats: a trial whose worker died is failed once its
    heartbeat is older than the grace period, and retried once with the same params.
    A storage that cannot be reached or created is one error line naming it
    (password masked), after a connection timeout of `CONNECT_TIMEOUT` seconds.
    """
    target = config.study_storage(url)
    shown = config.mask_url(target)  # the whole value is one URL, spaces included
    check_credentials(target)
    if is_rdb(url):
        if target.startswith("sqlite:///"):
            folder = Path(target[len("sqlite:///") :]).parent
            if not folder.is_dir():
                raise RuntimeError(f"--storage {shown}: folder {folder} does not exist")
        connect = {"connect_timeout": CONNECT_TIMEOUT} if target.startswith("postgres") else {}
        try:
            return optuna.storages.RDBStorage(
                target,
                engine_kwargs={"connect_args": connect} if connect else None,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=4 * HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                    max_retry=1
                ),
            )
        except Exception as exc:  # SQLAlchemy/driver errors: many types, many lines
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(
                f"--storage {shown}: cannot open the study storage: {first}"
            ) from None
    path = Path(target)
    check_journal(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(target))
    except OSError as exc:
        raise RuntimeError(f"{shown}: cannot create the study journal: {exc.strerror}") from None


def check_journal(path: Path) -> None:
    """A damaged journal line (a disk fault, a stray edit) is one error naming the file, the
    line and the repair, instead of a JSON traceback from Optuna at the study's next sync.
    The last line may be partial (a writer stopped mid-line): Optuna skips that one itself."""
    if not path.is_file():
        return
    with path.open("rb") as journal:
        lines = journal.read().split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the text after the last newline: partial
        try:
            json.loads(line)
        except ValueError:
            shown = line[:40].decode("utf-8", "replace")
            raise ValueError(
                f"{path}: line {number} is not a study journal record ({shown!r}); keep a copy "
                f"of the file, delete that line (sed -i '{number}d' {path}) and run again: the "
                "trials it recorded are redone"
            ) from None


def check_credentials(target: str) -> None:
    """A password holding a raw `@` is split at different `@`s by different parsers, which then
    print part of it as a host name: refused in one line before any parser sees it."""
    if "@" in config.credentials(target):
        raise RuntimeError(
            f"--storage {config.mask_url(target)}: the password holds a raw '@'; "
            "percent-encode it as %40"
        )


def check_storage(url: str | None = None) -> None:
    """Refuse a study storage that cannot work, before anything is created (nothing is written).

    A server database must answer within `CONNECT_TIMEOUT` seconds; a SQLite file's folder
    and a journal's nearest existing folder must be writable.
    """
    target = config.study_storage(url)
    shown = config.mask_url(target)  # the whole value is one URL, spaces included
    check_credentials(target)
    if not is_rdb(url) or target.startswith("sqlite:"):
        config.check_store_path()  # the tracking database lives in the store folder too
    if is_rdb(url) and not target.startswith("sqlite:"):
        connect = {"connect_timeout": CONNECT_TIMEOUT} if target.startswith("postgres") else {}
        try:
            engine = sqlalchemy.create_engine(target, connect_args=connect)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # SQLAlchemy/driver errors: many types, many lines
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(f"--storage {shown}: cannot connect: {first}") from None
        return
    path = Path(target[len("sqlite:///") :] if is_rdb(url) else target).expanduser()
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        raise RuntimeError(f"{shown}: the study storage is not writable (folder {folder})")
    if is_rdb(url) and not path.parent.is_dir():
        raise RuntimeError(f"--storage {shown}: folder {path.parent} does not exist")


def sampler(budget: Budget, worker: int = 0) -> optuna.samplers.BaseSampler:
    seed = budget.seed + 1000 * worker
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, budget.trials))


def pruner(budget: Budget) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=budget.warmup_epochs)


def load_or_create_study(
    step: str, model: str, storage: optuna.storages.BaseStorage, budget: Budget
) -> optuna.Study:
    return optuna.create_study(
        study_name=study_name(step, model),
        storage=storage,
        direction="maximize",
        sampler=sampler(budget),
        pruner=pruner(budget),
        load_if_exists=True,
    )


def fail_stale_trials(study: optuna.Study, rdb: bool) -> list[int]:
    """Fail trials whose process died: FAIL in Optuna, KILLED + `interrupted` in MLflow.

    RDB storage: only trials whose heartbeat expired (other machines' live
    workers are left alone). Journal storage has no heartbeats: every RUNNING
    trial is failed, so call this only when no other worker of the study is
    alive (the launcher does, before it starts workers).
    """
    if rdb:
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
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    client = MlflowClient()
    for trial in stale:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            store.mark_interrupted(client, run_id, results.last_logged(client, run_id))
    return [t.number for t in stale]


STORE_ATTR = "tracking_store"  # the identity of the tracking store a study's runs live in


def bind_store(handle: optuna.Study, storage_url: str | None, bind: bool = True) -> None:
    """A study's trials, parent and final are runs of one tracking store: the study remembers
    that store's identity (`store.identity`) when it first runs, and is never used with
    another. A study storage whose study belongs to another store (the database was moved
    aside or replaced, or two stores point OPTUNA_STORAGE at one journal) is refused in one
    line, before anything is written to either; a missing database is not created then."""
    recorded = handle.user_attrs.get(STORE_ATTR)
    parent = handle.user_attrs.get("mlflow_parent_run_id")
    used = bool(recorded or parent or handle.trials)
    if not store.store_exists():
        if used:
            _refuse_store(handle, storage_url, "its tracking database does not exist")
        if bind:
            handle.set_user_attr(STORE_ATTR, store.identity())
        return
    current = store.identity()
    if recorded is not None and recorded != current:
        _refuse_store(handle, storage_url, f"it was made with another one ({recorded})")
    if recorded is None and parent and not _run_exists(parent):
        _refuse_store(handle, storage_url, f"its parent run {parent} is not there")
    if recorded is None and bind:
        handle.set_user_attr(STORE_ATTR, current)


def _run_exists(run_id: str) -> bool:
    return results.run_tags(run_id) is not None


def _refuse_store(handle: optuna.Study, storage_url: str | None, why: str) -> None:
    target = config.study_storage(storage_url)
    uri = config.tracking_uri()
    database = config.sqlite_database(uri)
    where = str(database) if database is not None else config.mask_url(uri)
    raise RuntimeError(
        f"study {handle.study_name} in {config.mask_url(target)} belongs to another tracking "
        f"store than {where} ({why}): the database was moved aside or replaced, or two stores "
        "share one study storage; restore that database, or use another study storage "
        "(move the journal aside, or set OPTUNA_STORAGE) to start a fresh study"
    )


def ensure_parent_run(
    study: optuna.Study, step: str, model: str, storage_url: str, budget: Budget
) -> str:
    """The study's parent run, created once (before any trial) and remembered in the study."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        return run_id
    tags = {
        "study": study.study_name,
        "step": step,
        "model": model,
        "role": "study",
        "storage": config.mask_secrets(storage_url),
        **budget.tags(),
        **store.environment_tags(),
    }
    run = MlflowClient().create_run(store.experiment_id(step), run_name=f"study-{model}", tags=tags)
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def end_parent(parent: str, exc: BaseException) -> None:
    """A study that stops on an error: its parent run ends FAILED with the reason (KILLED on Ctrl-C)."""
    client = MlflowClient()
    if isinstance(exc, KeyboardInterrupt):
        store.mark_interrupted(client, parent)
        return
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    client.set_tag(
        parent, "fail_reason", config.mask_secrets(f"{type(exc).__name__}: {reason}")[:4000]
    )
    client.set_terminated(parent, status="FAILED")


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


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    quota: int,
    timeout: float | None = None,
) -> int:
    """Run trials in this process until it has added `quota` finished (COMPLETE or PRUNED) trials.

    A trial that raises is recorded FAIL and the study goes on; after
    `max(3, quota)` failures in a row something is wrong with every trial, and
    the error says so. Returns the trials added.
    """
    quiet_interrupts()
    started = time.perf_counter()
    added = failures = 0
    while added < quota:
        if timeout is not None and time.perf_counter() - started > timeout:
            print(f"[{study.study_name}] timeout reached after {added} trials", flush=True)
            break
        ran: list[optuna.trial.FrozenTrial] = []  # this call's trial (an enqueued one included)
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            callbacks=[_progress_line(started), lambda _, trial, ran=ran: ran.append(trial)],
        )
        if any(t.state in FINISHED for t in ran):
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


def join_study(step: str, model: str, budget: Budget, worker: int) -> optuna.Study:
    """A worker's handle on the prepared study, with its own sampler seed."""
    study = optuna.load_study(study_name=study_name(step, model), storage=make_storage())
    study.sampler = sampler(budget, worker + 1)
    study.pruner = pruner(budget)
    return study


def tag_best_trials(study: optuna.Study, best: optuna.trial.FrozenTrial) -> None:
    client = MlflowClient()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "best", "true" if trial.number == best.number else "false")


def log_parent(study: optuna.Study, best: optuna.trial.FrozenTrial, parent: str) -> None:
    """Best params, best_val_acc, trial counts and Optuna's plots on the study's parent run."""
    client = MlflowClient()
    if not any(key.startswith("best.") for key in results.run_params(parent)):
        # params are immutable: log them once; tags follow the best trial when a resume changes it
        client.log_batch(
            parent, params=[Param(f"best.{k}", str(v)) for k, v in best.params.items()]
        )
    for key, value in best.params.items():
        client.set_tag(parent, f"best.{key}", str(value))
    client.log_metric(parent, "best_val_acc", best.value)
    for state in TrialState:
        count = len(study.get_trials(deepcopy=False, states=(state,)))
        client.log_metric(parent, f"trials_{state.name.lower()}", count)
    client.set_tag(parent, "best_trial", str(best.number))
    experiment = study.study_name.split("/")[0]  # a study's experiment is its step
    client.log_metric(parent, "study_flops", results.study_flops(experiment, parent))
    if study.user_attrs.get("final_run_id"):
        client.set_tag(parent, "final_run_id", study.user_attrs["final_run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        for path in _study_plots(study, Path(tmp)):
            client.log_artifact(parent, str(path), artifact_path="optuna")
    client.set_terminated(parent, status="FINISHED")


def _study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    written = []
    for name, plot in (
        ("optimization_history", optuna_plots.plot_optimization_history),
        ("param_importances", optuna_plots.plot_param_importances),
        ("parallel_coordinate", optuna_plots.plot_parallel_coordinate),
        ("intermediate_values", optuna_plots.plot_intermediate_values),
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


def check_pinned(handle: optuna.Study, pinned: dict[str, Any]) -> None:
    """A study's trials and final are comparable only under one set of fixed settings (the
    step's and the user's `--set`): a study is never resumed with others. Recorded when the
    study first runs; a resume with other values is an error naming both."""
    current = {key: str(value) for key, value in sorted(pinned.items())}
    recorded = handle.user_attrs.get("pinned_settings")
    if recorded is None:
        handle.set_user_attr("pinned_settings", current)
        return
    changed = sorted(set(recorded) | set(current))
    changed = [k for k in changed if recorded.get(k) != current.get(k)]
    if changed:
        both = "; ".join(
            f"{k}: {recorded.get(k, '(not set)')} then, {current.get(k, '(not set)')} now"
            for k in changed
        )
        raise ValueError(
            f"study {handle.study_name} ran with other fixed settings ({both}): resume it "
            "with the same --set values, or use another store (MLRUNS_DIR)"
        )
