"""The report's champions section: the Task 1 and Task 2 champions with their rule, selection
and evaluation accuracies (95 % Wilson intervals), the Task 1 detector's numbers, Task 2's
whole field of candidates, its tie set and the tie-break rule fixed before any evaluation.
Runs are read only through `experiments.tracking.results` and `experiments.serving.registry`.
"""

from __future__ import annotations

import pandas as pd

from data_tools import load_split
from experiments.core import config
from experiments.core import statistics as st
from experiments.reporting import uncertainty
from experiments.serving import registry
from experiments.tracking import results
from experiments.training.inference import ProbabilityCache

SHIFT_EXPERIMENT = "task1-shift"


CHAMPION_COLUMNS = [
    *("task", "champion", "runs", "selection_acc", "selection_low", "selection_high"),
    *("selection_n", "eval_set", "eval_acc", "eval_low", "eval_high", "eval_n"),
]


def champions_markdown(
    test2_cache: ProbabilityCache | None = None, tta: bool = True
) -> tuple[list[str], pd.DataFrame]:
    """The two champions first: their rule (validation only), selection and evaluation numbers.
    `test2_cache`: TEST2 probabilities shared with the ensembles; `tta=False` leaves the TEST2
    cell of the TTA candidates other than the champion empty (`make report TTA=1` fills it).
    Returns the lines and the champions as a table (`champions.csv`: each accuracy with its
    95 % Wilson interval and its images)."""
    lines = ["## Champions (chosen on validation only; evaluation measured after)", ""]
    records = []
    field = registry.task2_candidates()  # SELECT2 predicted once for the table and the rule
    table = registry.candidates_table("TEST2", field, test2_cache, tta)
    for task, evaluated in ((1, "TEST"), (2, "TEST2")):
        try:
            champion = registry.choose(task, field if task == 2 else None)
        except RuntimeError as exc:
            lines.append(f"- Task {task}: no champion yet ({exc}).")
            continue
        runs = ", ".join(run_id[:12] for run_id in champion.run_ids)
        measured = registry.task1_measures(champion) if champion.detector else {}
        if task == 2:
            row = table[table["champion"]].iloc[0]
            evaluation = float(row[f"{evaluated}_acc (measured after)"])
            evaluation_n = int(row[f"{evaluated}_n"])
        elif measured:
            evaluation, evaluation_n = measured["TEST_acc"], int(measured["TEST_n"])
        else:
            evaluation = registry.accuracy_on(champion, evaluated)
            evaluation_n = len(load_split(evaluated, config.data_dir(), config.cache_dir()).labels)
        wilson = uncertainty.wilson_text
        records.append(_record(task, champion, evaluated, evaluation, evaluation_n))
        lines.append(
            f"- **Task {task}**: {champion.label} (run {runs}), selection accuracy "
            f"{wilson(champion.selection_acc, champion.selection_n)} "
            f"({champion.selection_n:,} validation images), **{evaluated} "
            f"{wilson(evaluation, evaluation_n)}** ({evaluation_n:,} images; 95 % Wilson "
            f"intervals). Rule: {registry.RULES[task]}."
        )
        if champion.detector:
            lines += task1_detector_lines(champion, measured)
        if task == 2:
            lines += tie_set_lines(field)
    if not table.empty:
        lines += _candidates_lines(table, tta)
    return ["", *lines, ""], pd.DataFrame(records, columns=CHAMPION_COLUMNS)


def _record(task: int, champion, evaluated: str, evaluation: float, evaluation_n: int) -> dict:
    """A champion as a row of `champions.csv`: its selection and evaluation accuracy, each
    with its 95 % Wilson interval and its number of images."""
    chosen = (
        st.accuracy_interval(
            round(champion.selection_acc * champion.selection_n), champion.selection_n
        )
        if champion.selection_n
        else None
    )
    measured = st.accuracy_interval(round(evaluation * evaluation_n), evaluation_n)
    return {
        "task": task,
        "champion": champion.label,
        "runs": " ".join(champion.run_ids),
        "selection_acc": champion.selection_acc,
        "selection_low": chosen.low if chosen else None,
        "selection_high": chosen.high if chosen else None,
        "selection_n": champion.selection_n,
        "eval_set": evaluated,
        "eval_acc": evaluation,
        "eval_low": measured.low,
        "eval_high": measured.high,
        "eval_n": evaluation_n,
    }


def _candidates_lines(table: pd.DataFrame, tta: bool) -> list[str]:
    return [
        "",
        "### Task 2 candidates (the rule's whole field; TEST2 measured after the choice)",
        "",
        "Study answers validated on SELECT2 and the fixed-recipe ensembles, with and "
        "without TTA. Only the selection column chooses; a higher TEST2 number elsewhere "
        "would be hindsight."
        + ("" if tta else " TEST2 of the TTA rows other than the champion: `make report TTA=1`."),
        "",
        _candidates_shown(table).to_markdown(index=False),
    ]


def _candidates_shown(table: pd.DataFrame) -> pd.DataFrame:
    """The candidates table as shown: selection and evaluation accuracy, each with its 95 %
    Wilson interval over its images (SELECT2; the evaluation set), the counts dropped."""
    shown = table.copy()
    for column in shown.columns:
        if column.endswith("_n"):
            continue
        if column.startswith("selection_acc") or column.endswith("(measured after)"):
            count = (
                "selection_n" if column.startswith("selection_acc") else column.split("_")[0] + "_n"
            )
            shown[column] = [
                uncertainty.wilson_text(v, n)
                for v, n in zip(shown[column], shown[count], strict=True)
            ]
    return shown.drop(columns=[c for c in shown.columns if c.endswith("_n")])


def tie_set_lines(field: list) -> list[str]:
    """Task 2's tie set: the candidates SELECT2 cannot tell apart from the best, and the rule,
    fixed in code before any evaluation number is read, that breaks the tie."""
    from experiments.core.statistics import TIE_BREAK_RULE, one_image_worth

    ties = registry.tied(field)
    best = ties.loc[ties["select_acc"].idxmax()]
    n = int(best["select_n"])
    names = ", ".join(f"{row['name']} ({row['select_acc']:.4f})" for _, row in ties.iterrows())
    return [
        f"  - Tie set: {len(ties)} of {len(field)} candidates lie within the best SELECT2 "
        f"accuracy's 95 % interval [{best['select_acc_low']:.4f}, {best['select_acc_high']:.4f}] "
        f"({n} images; one image is {one_image_worth(n):.4f}): {names}.",
        f"  - Tie-break: {TIE_BREAK_RULE}",
    ]


def task1_detector_lines(champion, measured: dict[str, float]) -> list[str]:
    """The Task 1 detector: its TRAIN-only proxy scores, then TEST measured after the fact,
    beside the hindsight-best (model, detector) pair of the shift analysis."""
    detector = champion.detector
    proxy = ", ".join(f"{k} {v:.3f}" for k, v in detector["proxy_auroc"].items())
    lines = [
        f"  - Detector **{detector['name']}**, {detector['chosen_by']}; AUROC on the "
        f"TRAIN-only proxy ({detector['proxy']}): {proxy}; threshold {detector['threshold']:.4f} "
        f"({detector['refuse_fraction']:.0%} of TRAIN validation refused).",
        f"  - On TEST, measured after: new-script AUROC "
        f"{uncertainty.interval_text(measured['auroc'], measured.get('auroc_ci_low'), measured.get('auroc_ci_high'), 3)}"
        f" (bootstrap over images), coverage {uncertainty.wilson_text(measured['coverage'], measured.get('TEST_n'), 3)}, "
        f"accuracy on the {int(measured.get('answered_n', 0)):,} answered images "
        f"{uncertainty.wilson_text(measured['answered_acc'], measured.get('answered_n'), 3)} "
        f"(all TEST {uncertainty.wilson_text(measured['TEST_acc'], measured.get('TEST_n'), 3)}; "
        "95 % Wilson intervals).",
    ]
    pairs = [
        (value, model, key[len("auroc_") :])
        for model, metrics in shift_metrics().items()
        for key, value in metrics.items()
        if key.startswith("auroc_") and key != "auroc_background" and "_ci_" not in key
    ]
    if pairs:
        value, model, name = max(pairs)
        lines.append(
            f"  - Hindsight (picked by TEST AUROC, not a result): {model} + {name}, "
            f"AUROC {value:.3f}."
        )
    return lines


def shift_metrics() -> dict[str, dict[str, float]]:
    """The newest `task1-shift` run's metrics per model (empty without `make task1-shift`)."""
    frame = results.runs(SHIFT_EXPERIMENT, state=None, newest=True, step=SHIFT_EXPERIMENT)
    if frame.empty:
        return {}
    return {row["tags.model"]: results.metrics_of(row) for _, row in frame.iterrows()}
