"""More seeds of a finished study's answer: the same settings, data and split, another seed.

Each seed run is tracked under its study like the study's final (`role=seed`, `seed_of` the
answer's run id, `seed` the training seed), made once and found again after. The answer's own
seed is seed 0 of the cell; `count` more seeds are answer seed + 1 ... answer seed + count,
so asking for more later adds only the missing ones. The report reads them as the cell's
mean ± sd over seeds; the answer itself is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from experiments.core.settings import TrainConfig
from experiments.core.steps import training_step
from experiments.search.study import study_name
from experiments.tracking import results, store
from experiments.training.checkpoint import load_checkpoint
from experiments.training.runner import (
    load_step_data,
    log_answer_tta,
    short_digest,
    train_and_log,
)

SEED_ROLE = results.SEED_ROLE


@dataclass(frozen=True)
class SeedRun:
    seed: int
    run_id: str
    metrics: dict[str, float]
    trained: bool  # False: found in the store


def config_from_flat(flat: dict) -> TrainConfig:
    """The TrainConfig of a checkpoint's flat settings (`TrainConfig.flat()`: knobs inline)."""
    names = {f.name for f in fields(TrainConfig)} - {"model_kwargs"}
    knobs = {k: v for k, v in flat.items() if k not in names}
    return TrainConfig(**{k: v for k, v in flat.items() if k in names}, model_kwargs=knobs)


def answer_of(step_name: str, model: str) -> tuple[str, str, str]:
    """(answer run id, study parent run id, study name) of a finished study, or one line."""
    step = training_step(step_name)
    answer = results.final_run(step.name, model)
    parent = results.study_parent(step.name, model)
    if answer is None:
        raise RuntimeError(
            f"{step.name}/{model} has no finished study answer to reseed: run "
            f"`make {step.name} MODELS={model}` first"
        )
    parent_id = parent["run_id"] if parent is not None else ""
    return answer["run_id"], parent_id, study_name(step.name, model)


def run_seeds(step_name: str, model: str, count: int, only: int | None = None) -> list[SeedRun]:
    """`count` more seeds of the study answer of (step, model), trained where missing;
    `only`: the `only`-th of them alone (1 ... count), for one scheduling goal per seed."""
    if count < 1:
        raise ValueError(f"seeds={count}: expected an integer >= 1")
    if only is not None and not 1 <= only <= count:
        raise ValueError(f"only={only}: expected one of the {count} seeds, 1 ... {count}")
    store.init()
    step = training_step(step_name)
    answer_id, parent_id, name = answer_of(step_name, model)
    flat = load_checkpoint(answer_id).checkpoint["config"]
    answer_cfg = config_from_flat(flat)
    data = load_step_data(step)
    check_same_data(step_name, answer_id, data)
    done: list[SeedRun] = []
    wanted = range(1, count + 1) if only is None else (only,)
    for seed in (answer_cfg.seed + k for k in wanted):
        found = results.runs(
            step.name, model=model, role=SEED_ROLE, seed_of=answer_id, seed=str(seed)
        )
        if not found.empty:
            run = found.iloc[0]
            done.append(SeedRun(seed, run["run_id"], results.metrics_of(run), trained=False))
            continue
        cfg = config_from_flat({**flat, "seed": seed})
        print(
            f"[{name}] seed {seed} of answer {answer_id[:12]} ({seed - answer_cfg.seed}/{count})",
            flush=True,
        )
        outcome = train_and_log(
            data,
            cfg,
            run_name=f"seed-{seed}",
            parent_run_id=parent_id or None,
            extra_tags={"study": name, "role": SEED_ROLE, "seed_of": answer_id, "seed": str(seed)},
            log_model=True,
            resumable=True,
        )
        if step.val_set is not None:  # like every Task 2 answer: its TTA views, once
            log_answer_tta(outcome.run_id, data)
        done.append(SeedRun(seed, outcome.run_id, outcome.metrics, trained=True))
    return done


def _training_seconds(answer: pd.Series) -> float:
    """About how long the answer's training took: its epochs times its last epoch's seconds
    (a resumed answer's run spans only its last sitting), else its run's span, else 0."""
    epochs, seconds = answer.get("metrics.epochs_run"), answer.get("metrics.epoch_seconds")
    if epochs is not None and seconds is not None and pd.notna(epochs) and pd.notna(seconds):
        return float(epochs) * float(seconds)
    span = answer.get("end_time") - answer.get("start_time")
    return span.total_seconds() if pd.notna(span) else 0.0


def plan(steps: list[str], models: list[str], count: int) -> list[tuple[str, str, int]]:
    """(step, model, k) for each of the `count` more seeds of every finished answer of
    `steps` x `models` that has no COMPLETE run yet, longest first: ordered by how long the
    answer's training took (a seed repeats it), so that JOBS lanes end close together. An
    answer missing stops with `answer_of`'s line."""
    goals = []
    for step_name in steps:
        step = training_step(step_name)
        for model in models:
            answer_id, _, _ = answer_of(step_name, model)
            answer = results.final_run(step.name, model)
            took = _training_seconds(answer)
            logged = answer.get("params.seed")  # the flat settings are the run's params
            base = int(logged) if logged is not None and not pd.isna(logged) else None
            if base is None:
                base = config_from_flat(load_checkpoint(answer_id).checkpoint["config"]).seed
            done = set(results.seed_runs(step_name, model, answer_id).get("tags.seed", []))
            for k in range(1, count + 1):
                if str(base + k) not in done:
                    goals.append((took, step_name, model, k))
    goals.sort(key=lambda goal: -goal[0])  # stable: ties keep the order of steps and models
    return [(step_name, model, k) for _, step_name, model, k in goals]


def check_same_data(step_name: str, answer_id: str, data) -> None:
    """Refuse, in one line, to reseed an answer on data other than the data it trained on."""
    step = training_step(step_name)
    key = f"data.{step.train_set}_fingerprint"
    logged = (results.run_tags(answer_id) or {}).get(key)
    now = short_digest(data.train_set.fingerprint)
    if logged and logged != now:
        raise RuntimeError(
            f"{step.name}: answer {answer_id[:12]} trained on {step.train_set} {logged}, but "
            f"DATA_DIR gives {now}: point DATA_DIR at its data, or rerun the study"
        )
