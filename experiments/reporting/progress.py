"""`make progress`: where a `make reproduce` stands, read from the store while it runs or
between its sittings: each study of `REPRODUCE_CHAINS` (finished, running, interrupted or
not started, its trials and its answer's evaluation accuracy with the 95 % interval the run
logged), the seed runs per answer, and the lane-minutes the runs have taken so far by role.

Nothing here chooses anything: it reads what the runs logged. The evaluation numbers of
finished answers are shown as measured after the choice, like everywhere else.
"""

from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from experiments.core.steps import REPRODUCE_CHAINS, training_step
from experiments.tracking import results
from models import MODELS

EVALUATION = (("TEST", "TEST_acc"), ("black", "TEST_black_acc"), ("TEST2", "TEST2_acc"))


DONE = ("COMPLETE", "PRUNED")  # a run's `state` tag when it ended as it should


def _state(parents: pd.DataFrame) -> str:
    """A study's state from its parent runs (newest first)."""
    if parents.empty:
        return "not started"
    status = str(parents.iloc[0]["status"])
    states = {"FINISHED": "finished", "RUNNING": "running", "KILLED": "interrupted"}
    return states.get(status, status.lower())


def _evaluation(answer: pd.Series | None) -> str:
    if answer is None:
        return ""
    cells = []
    for name, metric in EVALUATION:
        value = answer.get(f"metrics.{metric}")
        if value is None or pd.isna(value):
            continue
        low, high = answer.get(f"metrics.{metric}_ci_low"), answer.get(f"metrics.{metric}_ci_high")
        interval = f" [{low:.4f}, {high:.4f}]" if low is not None and pd.notna(low) else ""
        cells.append(f"{name} {value:.4f}{interval}")
    return "; ".join(cells)


def study_rows(frame: pd.DataFrame) -> list[dict[str, str]]:
    """One row per (step, model) of `make reproduce`, from every run of its experiments. A
    step that reuses another's answers (task2-step1) shows that step's study."""
    rows = []
    for _, chain in REPRODUCE_CHAINS:
        for step_name in chain:
            source = training_step(step_name).name
            runs = frame[frame["experiment"] == source]
            answers = results.study_models(source) if len(runs) else None  # once per step
            for model in MODELS:
                own = runs[_column(runs, "tags.model") == model]
                roles = _column(own, "tags.role")
                parents = own[roles == "study"]
                state = _state(parents)
                done = _column(own, "tags.state").isin(DONE)
                found = state == "finished" and answers is not None and model in answers.index
                answer = answers.loc[model] if found else None
                seeds = own[(roles == "seed") & done]
                reuse = source != step_name
                rows.append(
                    {
                        "study": f"{step_name}/{model}",
                        "state": f"{state} (reuses {source})" if reuse else state,
                        "trials": "-" if reuse else str(int(((roles == "trial") & done).sum())),
                        "answer": "" if answer is None else str(results.tag(answer, "role")),
                        "seeds": "-" if reuse else str(_column(seeds, "tags.seed").nunique()),
                        "evaluation (after the choice)": _evaluation(answer),
                    }
                )
    return rows


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """`frame[name]`, or an empty-valued column where no run has that tag yet."""
    return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)


def lane_minutes(frame: pd.DataFrame) -> pd.DataFrame:
    """Minutes the runs took, summed by role (a study's parent run spans its children and is
    left out): those that ended as they should (complete, or a pruned trial) apart from the
    interrupted, failed or running ones. An interrupted run counts until it last logged a
    metric; a running run up to now (one left RUNNING by a process killed with -9 keeps
    counting until its study runs again and ends it)."""
    columns = ["role", "runs", "complete or pruned", "interrupted, failed or running"]
    roles = _column(frame, "tags.role")
    runs = frame[roles.notna() & (roles != "study")]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    spans = results.run_spans(runs)
    minutes = (spans["end"] - spans["start"]).dt.total_seconds() / 60
    done = _column(runs, "tags.state").isin(DONE)
    table = pd.DataFrame(
        {
            "role": runs["tags.role"],
            "runs": 1,
            columns[2]: minutes.where(done, 0.0),
            columns[3]: minutes.where(~done, 0.0),
        }
    )
    table = table.groupby("role", as_index=False).sum()
    return table.round({columns[2]: 1, columns[3]: 1})[columns]


def progress_text() -> str:
    """The whole `make progress` text."""
    names = [name for _, chain in REPRODUCE_CHAINS for name in chain]
    frames = []
    for name in names:
        found = results.search(name)
        if not found.empty:
            frames.append(found.assign(experiment=name))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    rows = study_rows(frame) if not frame.empty else []
    if not rows:
        return "No study of `make reproduce` in this store yet."
    counts = pd.Series([row["state"].split(" (")[0] for row in rows]).value_counts()
    head = ", ".join(f"{counts[state]} {state}" for state in counts.index)
    lanes = lane_minutes(frame)
    return "\n".join(
        [
            f"Studies of `make reproduce`: {len(rows)} ({head}).",
            "",
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
            "",
            "Lane-minutes of the runs so far (one lane: one process's share of the CPU or GPU):",
            "",
            tabulate(lanes, headers="keys", tablefmt="github", showindex=False),
        ]
    )
