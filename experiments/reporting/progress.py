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

from experiments.core.steps import REPRODUCE_CHAINS, get_step
from experiments.tracking import results
from models import MODELS

EVALUATION = (("TEST", "TEST_acc"), ("black", "TEST_black_acc"), ("TEST2", "TEST2_acc"))


DONE = ("COMPLETE", "PRUNED")  # a run's `state` tag when it ended as it should


def _state(parents: pd.DataFrame) -> str:
    """A study's state from its parent runs (newest first)."""
    if parents.empty:
        return "not started"
    status = str(parents.iloc[0]["status"])
    return {"FINISHED": "finished", "RUNNING": "running", "KILLED": "interrupted"}.get(
        status, status.lower()
    )


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
    """One row per (step, model) of `make reproduce`, from every run of its experiments."""
    rows = []
    for _, chain in REPRODUCE_CHAINS:
        for step_name in chain:
            runs = frame[frame["experiment"] == step_name]
            trains = get_step(step_name).kind != "reuse"
            for model in MODELS:
                own = runs[runs.get("tags.model") == model] if "tags.model" in runs else runs[:0]
                roles = own.get("tags.role", pd.Series(dtype=str))
                parents = own[roles == "study"]
                state = _state(parents)
                done = own.get("tags.state", pd.Series(dtype=str)).isin(DONE)
                trials = own[(roles == "trial") & done]
                answer = results.final_run(step_name, model) if state == "finished" else None
                seeds = own[(roles == "seed") & (own.get("tags.state") == "COMPLETE")]
                rows.append(
                    {
                        "study": f"{step_name}/{model}",
                        "state": state,
                        "trials": str(len(trials)) if trains else "-",
                        "answer": "" if answer is None else str(results.tag(answer, "role")),
                        "seeds": str(seeds["tags.seed"].nunique()) if len(seeds) else "0",
                        "evaluation (after the choice)": _evaluation(answer),
                    }
                )
    return rows


def lane_minutes(frame: pd.DataFrame) -> pd.DataFrame:
    """Minutes the runs took, summed by role (a study's parent run spans its children and is
    left out): those that ended as they should (complete, or a pruned trial) apart from the
    interrupted, failed or running ones; a running run counts up to now."""
    columns = ["role", "runs", "complete or pruned", "interrupted, failed or running"]
    if frame.empty or "tags.role" not in frame:
        return pd.DataFrame(columns=columns)
    runs = frame[frame["tags.role"].notna() & (frame["tags.role"] != "study")].copy()
    end = runs["end_time"].fillna(pd.Timestamp.now(tz=runs["start_time"].dt.tz))
    runs["minutes"] = (end - runs["start_time"]).dt.total_seconds() / 60
    runs["done"] = runs.get("tags.state", pd.Series(index=runs.index, dtype=str)).isin(DONE)
    table = runs.groupby("tags.role").apply(
        lambda g: pd.Series(
            {
                "runs": len(g),
                columns[2]: round(g.loc[g["done"], "minutes"].sum(), 1),
                columns[3]: round(g.loc[~g["done"], "minutes"].sum(), 1),
            }
        ),
        include_groups=False,
    )
    return table.reset_index(names="role")


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
    counts = pd.Series([row["state"] for row in rows]).value_counts()
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
