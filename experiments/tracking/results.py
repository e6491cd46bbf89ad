"""The results layer: the one module that asks MLflow which runs exist.

Every question ("the newest COMPLETE final run of each study of a step", "the
study's parent run", "the pretraining run with this key") is answered here as
a pandas DataFrame from `mlflow.search_runs`: one row per run, columns
`run_id`, `status`, `start_time`, `tags.*`, `params.*`, `metrics.*`. The report,
ensembles, findings, transfer, the shift tools and the studies read runs only
through this module; writing runs is `tracking`'s and `runner`'s job.

Summary metrics (`best_val_acc`, `<SET>_acc`) are logged once per run, so the
`metrics.X` columns hold them (not a last-step value of a curve).
"""

from __future__ import annotations

import warnings

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from experiments.core.steps import training_step
from experiments.tracking import store

MAX_RESULTS = 5000


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def search(
    experiments: list[str] | str,
    tags: dict[str, str] | None = None,
    order_by: list[str] | None = None,
    max_results: int = MAX_RESULTS,
    status: str | None = None,
) -> pd.DataFrame:
    """Runs of the named experiments whose tags equal `tags` and whose status is `status`
    (RUNNING, FINISHED, FAILED, KILLED; None: any). Missing experiments: no rows."""
    if not store.store_exists():
        return pd.DataFrame(columns=["run_id", "status", "start_time"])
    store.init()
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    client = MlflowClient()
    ids = [e.experiment_id for n in names if (e := client.get_experiment_by_name(n)) is not None]
    if not ids:
        return pd.DataFrame(columns=["run_id", "status", "start_time"])
    clauses = [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
    if status is not None:
        clauses.append(f"attributes.status = {_quote(status)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = mlflow.search_runs(
            experiment_ids=ids,
            filter_string=" AND ".join(clauses),
            order_by=order_by or ["attributes.start_time DESC"],
            max_results=max_results,
        )
    return frame.reset_index(drop=True)


def runs(
    experiment: str,
    model: str | None = None,
    role: str | None = None,
    state: str | None = "COMPLETE",
    newest: bool = False,
    **tags: str,
) -> pd.DataFrame:
    """Runs of an experiment (a step's name) by model, role, state and other tags, newest first;
    `newest`: only the newest run of each model."""
    wanted = {"model": model, "role": role, "state": state, **tags}
    frame = search(experiment, {k: v for k, v in wanted.items() if v is not None})
    if newest and not frame.empty and "tags.model" in frame:
        frame = frame.drop_duplicates(subset=["tags.model"], keep="first")
    return frame.reset_index(drop=True)


def first_start(experiments: list[str]) -> float | None:
    """When the first run of the named experiments started (seconds since the epoch), or None
    where they hold no run."""
    frame = search(experiments, order_by=["attributes.start_time ASC"], max_results=1)
    if frame.empty:
        return None
    return float(frame["start_time"].iloc[0].timestamp())


def resumed_runs(experiments: list[str]) -> int:
    """How many runs of the named experiments continued from a state an earlier process
    saved (param `split.resumed_at_epoch`, experiments/training/resume.py)."""
    frame = search(experiments)
    column = "params.split.resumed_at_epoch"
    return 0 if column not in frame else int(frame[column].notna().sum())


def last_logged(client: MlflowClient, run_id: str) -> int | None:
    """When the run last logged a metric value (milliseconds since the epoch): the last sign
    of life of a run whose process died. None for a run that logged none."""
    run = client.get_run(run_id)
    stamps = [
        point.timestamp
        for key in run.data.metrics
        for point in client.get_metric_history(run_id, key)
    ]
    return max(stamps) if stamps else None


QUIET_S = 600  # an interrupted run that logged nothing for this long before its end was dead


def run_spans(frame: pd.DataFrame, alive: bool = True) -> pd.DataFrame:
    """`start` and `end` (UTC timestamps) of each run of `frame` (rows of `search`). An
    interrupted run whose end lies more than `QUIET_S` after its last logged metric was
    ended when found dead, not when it stopped: it ends at that metric (`last_logged`; at
    its start where it logged none). One stopped with Ctrl-C keeps its end. A RUNNING run ends now where
    `alive`, else (runs of a sitting that is over) when it last logged."""
    spans = pd.DataFrame(index=frame.index)
    for name in ("start", "end"):
        stamps = pd.to_datetime(frame[f"{name}_time"], utc=True)
        spans[name] = stamps.dt.as_unit("ms") if len(stamps) else stamps
    tags = frame.get("tags.interrupted", pd.Series(None, index=frame.index, dtype=object))
    dead = (tags == "true") | ((frame["status"] == "RUNNING") & (not alive))
    client = MlflowClient()
    for index in frame.index[dead]:
        stamp = last_logged(client, frame.at[index, "run_id"])
        last = pd.Timestamp(stamp, unit="ms", tz="UTC") if stamp else spans.at[index, "start"]
        ended = spans.at[index, "end"]
        if pd.isna(ended) or (ended - last).total_seconds() > QUIET_S:
            spans.at[index, "end"] = last
    return spans.fillna({"end": pd.Timestamp.now(tz="UTC")})


SEED_ROLE = "seed"  # experiments/search/seeds.py: more seeds of a study's answer


def seed_runs(step_name: str, model: str, answer_id: str) -> pd.DataFrame:
    """The COMPLETE seed runs of an answer (newest first), one per seed: a seed trained
    twice (two `make seeds` at once) counts once, its newest run."""
    step = training_step(step_name)
    found = runs(step.name, model=model, role=SEED_ROLE, seed_of=answer_id)
    if found.empty or "tags.seed" not in found:
        return found
    return found.drop_duplicates(subset=["tags.seed"], keep="first").reset_index(drop=True)


def study_models(experiment: str) -> pd.DataFrame:
    """Each model's study answer in a step, indexed by model: the run its newest study parent
    names in `selected_run` (the best trial's retrain or the baseline, chosen on validation)
    when that run is COMPLETE, else the model's newest COMPLETE final."""
    frame = search(experiment, {"state": "COMPLETE"})
    if frame.empty or "tags.role" not in frame:
        return frame.iloc[0:0]
    parents = search(experiment, {"role": "study"})
    named = set()
    if "tags.selected_run" in parents:
        newest = parents.drop_duplicates(subset=["tags.model"], keep="first")
        named = set(newest["tags.selected_run"].dropna())
    chosen = frame[frame["run_id"].isin(named)]
    finals = frame[frame["tags.role"] == "final"]
    frame = pd.concat([chosen, finals]).drop_duplicates(subset=["tags.model"], keep="first")
    return frame.set_index("tags.model", drop=False)


def final_run(step: str, model: str) -> pd.Series | None:
    """The study answer of (step, model): its selected run, else its newest final, else None."""
    frame = study_models(step)
    return frame.loc[model] if model in frame.index else None


def role_run(step: str, model: str, role: str) -> pd.Series | None:
    """The newest COMPLETE run of the study (step, model) with this role (final, baseline)."""
    frame = runs(step, model=model, role=role)
    return None if frame.empty else frame.iloc[0]


def best_trial_run(step: str, model: str) -> pd.Series | None:
    """The COMPLETE trial run with the best validation accuracy (earliest on ties), or None."""
    frame = runs(step, model=model, role="trial")
    if frame.empty or "metrics.best_val_acc" not in frame:
        return None
    frame = frame.sort_values(["metrics.best_val_acc", "start_time"], ascending=[False, True])
    return frame.iloc[0]


def running(experiment: str, study: str) -> pd.DataFrame:
    """Runs of a study (its parent, trials and finals) that MLflow still shows RUNNING."""
    return search(experiment, {"study": study}, status="RUNNING")


def study_parent(step: str, model: str) -> pd.Series | None:
    """The newest parent run (`role=study`) of the study (step, model), or None."""
    frame = runs(step, model=model, role="study", state=None)
    return None if frame.empty else frame.iloc[0]


def running_runs(experiment: str) -> list[str]:
    """Ids of the experiment's runs still RUNNING."""
    frame = search(experiment, status="RUNNING")
    return [] if frame.empty else list(frame["run_id"])


def study_flops(experiment: str, parent_run_id: str) -> float:
    """The model FLOPs of every run a study's parent holds (trials, final, baseline), the
    answer's TTA predictions included (`answer_flops`)."""
    frame = search(experiment, {"mlflow.parentRunId": parent_run_id})
    if not frame.empty and "tags.role" in frame:  # more seeds of the answer: not the study's
        frame = frame[frame["tags.role"] != "seed"]
    if frame.empty or "metrics.total_flops" not in frame:
        return 0.0
    answer = frame["metrics.answer_flops"].fillna(0).sum() if "metrics.answer_flops" in frame else 0
    return float(frame["metrics.total_flops"].fillna(0).sum() + answer)


def run_metrics(run_id: str) -> dict[str, float]:
    """The summary metrics of one run."""
    store.init()
    return dict(MlflowClient().get_run(run_id).data.metrics)


def run_params(run_id: str) -> dict[str, str]:
    store.init()
    return dict(MlflowClient().get_run(run_id).data.params)


def run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of one run; None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    store.init()
    try:
        return dict(MlflowClient().get_run(run_id).data.tags)
    except MlflowException:
        return None


def metrics_of(row: pd.Series | None) -> dict[str, float]:
    """The `metrics.*` columns of a run row as a plain dict (NaN columns left out)."""
    if row is None:
        return {}
    return {
        key[len("metrics.") :]: float(value)
        for key, value in row.items()
        if key.startswith("metrics.") and pd.notna(value)
    }


def tag(row: pd.Series, key: str, default: str = "") -> str:
    value = row.get(f"tags.{key}")
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else value


def every_run_data(tracking_uri: str) -> list[tuple[dict[str, str], dict[str, float]]]:
    """(params, metrics) of every run of every experiment in the store at `tracking_uri`
    (another store than the project's: the whole-study bench reads throw-away ones)."""
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=50_000)
    return [(run.data.params, run.data.metrics) for run in runs]
