"""Each cell's uncertainty: a 95 % interval over the evaluation images, the spread over seeds,
the paired test of the searched final against its baseline, and the verdict against the
original study's number. Read from the runs already logged (their predictions on the
evaluation sets); nothing is retrained. The statistics are `experiments.core.statistics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from experiments.core import statistics as st
from experiments.core.steps import STEPS, training_step
from experiments.tracking import results
from experiments.training.inference import ProbabilityCache

UNCERTAINTY_COLUMNS = [
    "n_images",
    "acc_low",
    "acc_high",
    "seeds",
    "seed_values",
    "seed_mean",
    "seed_sd",
    "estimate",
    "estimate_low",
    "estimate_high",
    "versus_reference",
    "black_n",
    "black_low",
    "black_high",
    "white_n",
    "white_low",
    "white_high",
    "val_n",
    "val_low",
    "val_high",
    "baseline_low",
    "baseline_high",
    "searched_low",
    "searched_high",
    "vs_baseline_diff",
    "vs_baseline_low",
    "vs_baseline_high",
    "vs_baseline_p",
    "vs_baseline",
    "vs_baseline_test",
]


@dataclass
class EvalSet:
    """An evaluation set's labels and the probabilities of runs on it (logged, else predicted)."""

    labels: np.ndarray
    probabilities: ProbabilityCache

    def correct(self, run_id: str) -> np.ndarray:
        return self.probabilities(run_id, False).argmax(1).numpy() == self.labels


def _interval(acc: float, n: float) -> st.Interval:
    return st.accuracy_interval(int(round(acc * n)), int(n))


def _seed_values(cell: pd.Series, evaluated: str) -> list[float]:
    """The cell's accuracy over seeds: the answer's own, then each seed run's."""
    values = [float(cell["accuracy"])]
    found = results.seed_runs(cell["step"], cell["model"], cell["run_id"])
    if not found.empty and f"metrics.{evaluated}_acc" in found:
        values += [float(v) for v in found[f"metrics.{evaluated}_acc"].dropna()]
    return values


def ab_pair(parent: pd.Series | None) -> tuple[str, str, str]:
    """(searched run, baseline run, fidelity) of a study's searched-against-defaults pair:
    the final and the `baseline` run ("final"), or the best trial and trial 0 ("trial",
    budgets that train no baseline); empty strings where the study has none."""
    if parent is None:
        return "", "", ""
    if results.tag(parent, "ab_fidelity") == "trial":
        searched, baseline = (
            results.tag(parent, "ab_searched_run"),
            results.tag(parent, "ab_baseline_run"),
        )
        return searched, baseline, "trial"
    return results.tag(parent, "final_run"), results.tag(parent, "baseline_run"), "final"


def _versus_baseline(cell: pd.Series, eval_set: EvalSet | None) -> dict:
    """The searched final against the baseline on the same images (exact McNemar), or over
    seeds (t-test) when both have more than one seed."""
    step = training_step(cell["step"])
    parent = results.study_parent(step.name, cell["model"])
    if parent is None or eval_set is None:
        return {}
    final, baseline, _ = ab_pair(parent)
    if not final or not baseline:
        return {}
    if final == baseline:  # the defaults trial won: one run is both
        test = st.mcnemar_exact(eval_set.correct(final), eval_set.correct(final))
        method = "same run"
    else:
        evaluated = STEPS[cell["step"]].primary_eval
        final_seeds = _run_values(step.name, cell["model"], final, evaluated)
        base_seeds = _run_values(step.name, cell["model"], baseline, evaluated)
        if len(final_seeds) > 1 and len(base_seeds) > 1:
            test, method = st.seeds_paired_test(final_seeds, base_seeds), "t-test over seeds"
        else:
            test = st.mcnemar_exact(eval_set.correct(final), eval_set.correct(baseline))
            method = "exact McNemar"
    return {
        "vs_baseline_diff": test.difference,
        "vs_baseline_low": test.low,
        "vs_baseline_high": test.high,
        "vs_baseline_p": test.p_value,
        "vs_baseline": test.verdict,
        "vs_baseline_test": method,
    }


def _run_values(step: str, model: str, run_id: str, evaluated: str) -> list[float]:
    value = results.run_metrics(run_id).get(f"{evaluated}_acc")
    found = results.seed_runs(step, model, run_id)
    values = [] if value is None else [value]
    if not found.empty and f"metrics.{evaluated}_acc" in found:
        values += [float(v) for v in found[f"metrics.{evaluated}_acc"].dropna()]
    return values


def cell_uncertainty(cell: pd.Series, sizes: dict[str, int], eval_set: EvalSet | None) -> dict:
    """The uncertainty columns of one filled cell."""
    evaluated = STEPS[cell["step"]].primary_eval
    metrics = results.run_metrics(cell["run_id"])
    n = metrics.get(f"{evaluated}_n") or sizes[evaluated]
    interval = _interval(cell["accuracy"], n)
    values = _seed_values(cell, evaluated)
    summary = st.seed_summary(values)
    estimate = _interval(summary.mean, n)
    estimate = st.widen(estimate, summary.sd, summary.n) if summary.sd else estimate
    row = {
        "n_images": int(n),
        "acc_low": interval.low,
        "acc_high": interval.high,
        "seeds": summary.n,
        "seed_values": tuple(float(v) for v in values),
        "seed_mean": summary.mean,
        "seed_sd": summary.sd,
        "estimate": summary.mean,
        "estimate_low": estimate.low,
        "estimate_high": estimate.high,
    }
    if pd.notna(cell["reference"]):
        plain = _interval(summary.mean, n)  # the images' noise; the seeds' is added inside
        row["versus_reference"] = st.versus_reference(
            plain, float(cell["reference"]), summary.sd, summary.n
        )
    for half in ("black", "white"):
        if pd.notna(cell.get(f"{half}_acc")):
            half_n = metrics.get(f"{evaluated}_{half}_n") or sizes.get(f"{evaluated}_{half}")
            if half_n:
                found = _interval(cell[f"{half}_acc"], half_n)
                row.update({f"{half}_n": int(half_n), f"{half}_low": found.low})
                row[f"{half}_high"] = found.high
    if pd.notna(cell.get("best_val_acc")) and pd.notna(cell.get("val_n")) and cell["val_n"]:
        found = _interval(cell["best_val_acc"], cell["val_n"])
        row.update(val_n=int(cell["val_n"]), val_low=found.low, val_high=found.high)
    for arm in ("baseline", "searched"):  # the A/B's two accuracies, on the same n images
        if pd.notna(cell.get(f"{arm}_acc")):
            found = _interval(cell[f"{arm}_acc"], n)
            row.update({f"{arm}_low": found.low, f"{arm}_high": found.high})
    row.update(_versus_baseline(cell, eval_set))
    return row


def add_uncertainty(
    cells: pd.DataFrame, sizes: dict[str, int], eval_sets: dict[str, EvalSet]
) -> pd.DataFrame:
    """`cells` with the uncertainty columns (empty for cells without a run)."""
    rows = []
    for _, cell in cells.iterrows():
        if pd.isna(cell["accuracy"]) or not cell.get("run_id"):
            rows.append({})
            continue
        evaluated = STEPS[cell["step"]].primary_eval
        rows.append(cell_uncertainty(cell, sizes, eval_sets.get(evaluated)))
    extra = pd.DataFrame(rows, index=cells.index).reindex(columns=UNCERTAINTY_COLUMNS)
    return pd.concat([cells.drop(columns=UNCERTAINTY_COLUMNS, errors="ignore"), extra], axis=1)


def interval_text(value, low, high, digits: int = 4) -> str:
    """'0.9885 [0.9854, 0.9911]'; the bare value without an interval; '—' without a value."""
    if value is None or pd.isna(value):
        return "—"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def wilson_text(value, n, digits: int = 4) -> str:
    """`value`, a fraction of `n` images, with its 95 % Wilson interval: '0.9885 [0.9854, 0.9911]'."""
    if value is None or pd.isna(value) or not n:
        return interval_text(value, None, None, digits)
    found = _interval(float(value), n)
    return interval_text(value, found.low, found.high, digits)


def estimate_text(cell: pd.Series, digits: int = 3) -> str:
    """'0.563 [0.550, 0.575]', or '0.986 ± 0.002 (3 seeds) [0.982, 0.990]' over seeds."""
    if pd.isna(cell.get("estimate")):
        return ""
    low, high = cell["estimate_low"], cell["estimate_high"]
    spread = ""
    if cell["seeds"] > 1 and not math.isnan(cell["seed_sd"]):
        spread = f" ± {cell['seed_sd']:.{digits}f} ({int(cell['seeds'])} seeds)"
    return f"{cell['estimate']:.{digits}f}{spread} [{low:.{digits}f}, {high:.{digits}f}]"
