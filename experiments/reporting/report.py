"""The comparison report: the best run of every study, side by side with the reference table.

Reads runs only through `experiments.tracking.results` (DataFrames from
`mlflow.search_runs`) and renders DataFrames to markdown, CSV and a heatmap.
For each (step, model) cell it takes the study's `final` run (the best COMPLETE
trial retrained on the whole training split); a study without one falls back
to its best trial. Missing studies are empty cells, not errors. This module
writes every markdown file of `reports/` (the comparison and Task 1's shift
tables); the prose comes from `findings`.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from data_tools import load_split  # noqa: E402
from experiments.analysis import ensemble  # noqa: E402
from experiments.core import config
from experiments.core import statistics as st
from experiments.core.steps import STEPS, training_step  # noqa: E402
from experiments.reporting import findings, uncertainty
from experiments.reporting.forest import forest_plot
from experiments.serving import registry
from experiments.tracking import results, store
from experiments.training.checkpoint import load_checkpoint  # noqa: E402
from experiments.training.inference import ProbabilityCache  # noqa: E402
from models import MODELS, title  # noqa: E402

REPORT_EXPERIMENT = "report"
SHIFT_EXPERIMENT = "task1-shift"
CELL_COLUMNS = [
    "step",
    "row",
    "model",
    "accuracy",
    "reference",
    "delta",
    "black_acc",
    "white_acc",
    "best_val_acc",
    "val_n",
    "baseline_acc",
    "searched_acc",
    "searched_minus_baseline",
    "ab_fidelity",
    "selected",
    "trials",
    "study_tflop",
    "run_id",
    "source",
]

# TASKS.md, reference notebooks: accuracy on the evaluation set
REFERENCE: dict[str, dict[str, float]] = {
    "task1-step1": {"vgg": 0.59, "resnet": 0.57, "efficientnet": 0.57, "hybrid": 0.57},
    "task1-step2": {"vgg": 0.53, "resnet": 0.55, "efficientnet": 0.54, "hybrid": 0.57},
    "task2-step1": {"vgg": 0.22, "resnet": 0.19, "efficientnet": 0.15, "hybrid": 0.14},
    "task2-step2": {"vgg": 0.96, "resnet": 0.92, "efficientnet": 0.95, "hybrid": 0.97},
    "task2-step3": {"vgg": 0.96, "resnet": 0.96, "efficientnet": 0.96, "hybrid": 0.97},
}


def _cell(step_name: str, model: str) -> dict:
    """One (step, model) cell: the study's final run, else its best trial, else empty."""
    step = STEPS[step_name]
    source = training_step(step_name)
    reference = REFERENCE.get(step_name, {}).get(model)
    cell = {"step": step_name, "row": step.row_label, "model": model, "reference": reference}
    run, origin = results.final_run(source.name, model), "final"
    if run is None:
        run, origin = results.best_trial_run(source.name, model), "best-trial"
    if run is None:
        return cell
    metrics = results.metrics_of(run)
    evaluated = step.primary_eval
    cell.update(
        accuracy=metrics.get(f"{evaluated}_acc"),
        black_acc=metrics.get(f"{evaluated}_black_acc"),
        white_acc=metrics.get(f"{evaluated}_white_acc"),
        best_val_acc=metrics.get("best_val_acc"),
        val_n=pd.to_numeric(run.get("params.split.val_images"), errors="coerce"),
        run_id=run["run_id"],
        source=origin,
    )
    parent_run = results.study_parent(source.name, model)
    searched_run, baseline_run, fidelity = uncertainty.ab_pair(parent_run)
    named = {"baseline": baseline_run, "final": searched_run}  # the pair the study compared
    cell["ab_fidelity"] = fidelity or None
    baseline = (
        results.run_metrics(named["baseline"])
        if named["baseline"]
        else results.metrics_of(results.role_run(source.name, model, "baseline"))
    )
    searched = (
        results.run_metrics(named["final"])
        if named["final"]
        else results.metrics_of(results.role_run(source.name, model, "final"))
    )
    cell["baseline_acc"] = baseline.get(f"{evaluated}_acc")
    cell["searched_acc"] = searched.get(f"{evaluated}_acc")
    cell["selected"] = results.tag(run, "role") if results.tag(run, "selected") == "true" else ""
    parent = results.metrics_of(results.study_parent(source.name, model))
    if parent:
        cell["trials"] = int(parent.get("trials_complete", 0) + parent.get("trials_pruned", 0))
        if parent.get("study_flops"):
            cell["study_tflop"] = parent["study_flops"] / 1e12  # trials, final and baseline
    return cell


def collect(models: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per (declared step, model): the cells of the comparison table."""
    rows = [_cell(step, model) for step in STEPS for model in (models or tuple(MODELS))]
    cells = pd.DataFrame(rows, columns=CELL_COLUMNS)
    cells["delta"] = cells["accuracy"] - cells["reference"]
    cells["searched_minus_baseline"] = cells["searched_acc"] - cells["baseline_acc"]
    return cells


def _fmt(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(cell: pd.Series) -> str:
    if pd.isna(cell["accuracy"]):
        return ""
    if pd.isna(cell.get("estimate")):  # no interval computed (collect() alone)
        shown = f"**{_fmt(cell['accuracy'])}**"
    else:
        value, _, rest = uncertainty.estimate_text(cell).partition(" ")
        shown = f"**{value}** {rest}"
    if pd.notna(cell["reference"]):
        verdict = cell.get("versus_reference")
        verdict = f": {verdict}" if isinstance(verdict, str) else ""
        shown += f" (ref {_fmt(cell['reference'], 2)}{verdict})"
    return shown


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Rows = steps, columns = models, each cell 'accuracy [95 % interval] (reference: verdict)'
    (mean ± sd over seeds where a cell has several)."""
    text = cells.assign(text=cells.apply(_cell_text, axis=1))
    table = text.pivot(index="row", columns="model", values="text")
    rows = list(dict.fromkeys(cells["row"]))
    models = list(dict.fromkeys(cells["model"]))
    table = table.loc[rows, models].rename(columns=title)
    table.index.name = "trained / evaluated"
    return table.reset_index()


README_START = "<!-- results table: written by `make report` from reports/comparison.csv -->"
README_END = "<!-- end of results table -->"


def headline_table(cells: pd.DataFrame) -> str:
    """The README's results table: the comparison table of the steps that were run."""
    run = cells.groupby("step")["accuracy"].transform(lambda a: a.notna().any())
    return comparison_table(cells[run]).to_markdown(index=False)


def update_readme(path: Path, table: str) -> bool:
    """Rewrite the table between the README's markers (False: no markers, nothing written)."""
    text = path.read_text() if path.exists() else ""
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not (start and end):
        return False
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return True


def provenance() -> str:
    """Where a generated report's numbers come from: the store, the code and the date."""
    commit = store.environment_tags().get("git_commit", "unknown")
    commit = commit[:12] + (" with uncommitted changes" if commit.endswith("-dirty") else "")
    where = config.mask_secrets(config.tracking_uri())
    root = f"sqlite:///{config.PROJECT_ROOT.as_posix()}/"
    if where.startswith(root):  # the project's own store: named the same on every machine
        where = where[len(root) :]
    return f"Generated on {time.strftime('%Y-%m-%d %H:%M')} from the store {where}, code {commit}."


def _missing_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """NaN and NA as None, which tabulate writes as its `missingval` (it prints NaN as nan)."""
    return frame.astype(object).where(frame.notna(), None)


def _with_intervals(frame: pd.DataFrame, value: str, low: str, high: str) -> list[str]:
    """Column `value` as 'value [low, high]' text, row by row ('—' where there is no value)."""
    return [
        uncertainty.interval_text(*row)
        for row in zip(frame[value], _get(frame, low), _get(frame, high), strict=True)
    ]


def _details(cells: pd.DataFrame) -> pd.DataFrame:
    """The per-cell details table: each accuracy with its 95 % Wilson interval (the CSV has
    the limits as columns), integers as integers, short run ids, TFLOP to one decimal."""
    return pd.DataFrame(
        {
            "step": cells["step"],
            "model": cells["model"],
            "accuracy [95 %]": _with_intervals(cells, "accuracy", "acc_low", "acc_high"),
            "images": _get(cells, "n_images").astype("Int64"),
            "seeds": _get(cells, "seeds").astype("Int64"),
            "seed sd": _get(cells, "seed_sd").map(lambda v: "—" if pd.isna(v) else f"{v:.4f}"),
            "black half [95 %]": _with_intervals(cells, "black_acc", "black_low", "black_high"),
            "white half [95 %]": _with_intervals(cells, "white_acc", "white_low", "white_high"),
            "selection (validation) [95 %]": _with_intervals(
                cells, "best_val_acc", "val_low", "val_high"
            ),
            "validation images": _get(cells, "val_n").astype("Int64"),
            "trials": cells["trials"].astype("Int64"),
            "study TFLOP": cells["study_tflop"].map(lambda v: "" if pd.isna(v) else f"{v:,.1f}"),
            "run_id": cells["run_id"].fillna("").str[:12],
            "source": cells["source"].fillna(""),
        }
    )


def _get(frame: pd.DataFrame, name: str) -> pd.Series:
    """`frame[name]`, or NaN throughout when the column is absent (cells without uncertainty)."""
    return frame[name] if name in frame else pd.Series(float("nan"), index=frame.index)


def _baselines(cells: pd.DataFrame) -> pd.DataFrame:
    """Searched final against baseline: both accuracies, the paired test's difference, its
    95 % interval, p-value and verdict."""
    frame = cells[cells["baseline_acc"].notna()]
    interval = [
        "" if pd.isna(low) else f"[{low:+.4f}, {high:+.4f}]"
        for low, high in zip(frame["vs_baseline_low"], frame["vs_baseline_high"], strict=True)
    ]
    return pd.DataFrame(
        {
            "step": frame["step"],
            "model": frame["model"],
            "baseline_acc [95 %]": _with_intervals(
                frame, "baseline_acc", "baseline_low", "baseline_high"
            ),
            "searched_acc [95 %]": _with_intervals(
                frame, "searched_acc", "searched_low", "searched_high"
            ),
            "searched - baseline": frame["vs_baseline_diff"],
            "95 % interval": interval,
            "p": frame["vs_baseline_p"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}"),
            "verdict": frame["vs_baseline"],
            "test": frame["vs_baseline_test"],
            "fidelity": _get(frame, "ab_fidelity"),
            "selected": frame["selected"],
        }
    )


def to_markdown(cells: pd.DataFrame) -> str:
    run = cells.groupby("step")["accuracy"].transform(lambda a: a.notna().any())
    not_run = list(dict.fromkeys(cells.loc[~run, "step"]))
    cells = cells[run]
    details = _details(cells)
    baselines = _baselines(cells)
    lines = [
        "# Comparison: best run of every study",
        "",
        "## Headline: evaluation accuracy with 95 % intervals",
        "",
        "Each cell: evaluation accuracy of the study's answer: its best COMPLETE trial retrained",
        "on the whole training split, or its baseline (the hand-set defaults trained the same way),",
        "whichever has the higher validation accuracy. In square brackets its 95 % interval:",
        "Wilson over the evaluation images (6,000 per set); for a cell with several seeds",
        "(`make seeds`) the mean ± sd over seeds, the interval widened by the seed sd. In round",
        "brackets the reference notebooks' number: *within noise* when it lies inside the",
        "interval, else *above* / *below* (this study's number against it). docs/statistics.md",
        "says what each interval and test means."
        + (
            f" Not run here (`make beyond` and the step targets): {', '.join(not_run)}."
            if not_run
            else ""
        ),
        "",
        comparison_table(cells).to_markdown(index=False),
        "",
        "![accuracy of every cell with its 95 % interval](comparison.png)",
        "",
        "## Details per cell",
        "",
        _missing_as_none(details).to_markdown(index=False, floatfmt=".4f", missingval="—"),
        "",
        "## Searched against the hand-set defaults",
        "",
        "Every study compares its searched settings with its model's hand-set defaults (its",
        "trial 0) at one fidelity (*fidelity*). *final*: the defaults trained exactly like the",
        "final (`role=baseline`), *searched* the best trial retrained, and the study's answer",
        "(the cell above) is whichever of the two has the higher validation accuracy on the",
        "full validation split (*selected*). *trial* (budgets that train no baseline): the",
        "best trial against trial 0, both at trial fidelity, and the answer is the final.",
        "Evaluation accuracy on the step's evaluation set; measured after the fact, never",
        "used to choose.",
        "The paired test runs on the same evaluation images: exact McNemar on the images the",
        "two runs disagree on (a t-test over seeds where both have several); its interval is a",
        "paired bootstrap of the difference. *better* / *worse*: p < 0.05; otherwise *no",
        "detectable difference*.",
        "",
        _missing_as_none(baselines).to_markdown(index=False, floatfmt=".4f", missingval="—")
        if not baselines.empty
        else "No baseline runs yet.",
        "",
        "## Steps",
        "",
    ]
    for step in STEPS.values():
        source = f" Cells come from the {step.source} studies." if step.kind == "reuse" else ""
        lines.append(
            f"- **{step.name}** ({step.row_label}, {step.kind}): {step.description}. "
            f"Labels read: {step.label_use}.{source}"
        )
    return "\n".join(lines) + "\n"


def forest_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """The forest plot's rows from the comparison's cells (or its CSV): one panel per step's
    row label, a point per model at its estimate with its 95 % interval, seeds as dots."""
    filled = cells[cells["estimate"].notna()]
    return pd.DataFrame(
        {
            "step": filled["row"],
            "cell": filled["model"].map(title),
            "acc": filled["estimate"],
            "acc_low": filled["estimate_low"],
            "acc_high": filled["estimate_high"],
            "seed_values": filled["seed_values"],
            "reference": filled["reference"],
        }
    )


def eval_sets() -> tuple[dict[str, int], dict[str, uncertainty.EvalSet], ProbabilityCache]:
    """The evaluation sets' sizes (and TEST's black half), their labels and probability caches
    (logged predictions first); TEST2's cache is shared with the ensembles and champions."""
    sizes, sets = {}, {}
    for name in ("TEST", "TEST2"):
        split = load_split(name, config.data_dir(), config.cache_dir())
        sizes[name] = len(split.labels)
        sizes[f"{name}_black"] = int((~split.white).sum())
        cache = ProbabilityCache(split.images, load_checkpoint, split.fingerprint)
        sets[name] = uncertainty.EvalSet(split.labels.numpy(), cache)
    return sizes, sets, sets["TEST2"].probabilities


def ensembles_markdown(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return []
    table = pd.DataFrame(
        {
            "ensemble": frame["ensemble"],
            "k": frame["k"],
            "TTA": frame["tta"].map({True: "yes", False: "no"}),
            "TEST2 acc [95 %]": _with_intervals(frame, "accuracy", "acc_low", "acc_high"),
            "images": _get(frame, "n_images").astype("Int64"),
            "members": frame["members_text"],
        }
    )
    return [
        "",
        "## Ensembles and test-time augmentation (TEST2)",
        "",
        "Softmax averages of final runs. *best k*: a step's k final runs with the highest",
        "validation accuracy on that step's own split; *all*: every final run of the Task 2 steps",
        "that train on labelled TEST images, a rule fixed in advance. TEST2 labels only score.",
        "TTA: each member averaged over the image and its four one-pixel shifts.",
        "",
        table.to_markdown(index=False),
    ]


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
        chosen = (
            st.accuracy_interval(
                round(champion.selection_acc * champion.selection_n), champion.selection_n
            )
            if champion.selection_n
            else None
        )
        measured_interval = st.accuracy_interval(round(evaluation * evaluation_n), evaluation_n)
        records.append(
            {
                "task": task,
                "champion": champion.label,
                "runs": " ".join(champion.run_ids),
                "selection_acc": champion.selection_acc,
                "selection_low": chosen.low if chosen else None,
                "selection_high": chosen.high if chosen else None,
                "selection_n": champion.selection_n,
                "eval_set": evaluated,
                "eval_acc": evaluation,
                "eval_low": measured_interval.low,
                "eval_high": measured_interval.high,
                "eval_n": evaluation_n,
            }
        )
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
        lines += [
            "",
            "### Task 2 candidates (the rule's whole field; TEST2 measured after the choice)",
            "",
            "Study answers validated on SELECT2 and the fixed-recipe ensembles, with and "
            "without TTA. Only the selection column chooses; a higher TEST2 number elsewhere "
            "would be hindsight."
            + (
                ""
                if tta
                else " TEST2 of the TTA rows other than the champion: `make report TTA=1`."
            ),
            "",
            _candidates_shown(table).to_markdown(index=False),
        ]
    return ["", *lines, ""], pd.DataFrame(records, columns=CHAMPION_COLUMNS)


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


def write_shift_report(out: str | Path | None = None) -> Path:
    """reports/task1_shift.md from every model's newest shift run."""
    out_dir = config.reports_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "task1_shift.md"
    frame = results.runs(SHIFT_EXPERIMENT, state=None, newest=True, step=SHIFT_EXPERIMENT)
    runs = ", ".join(
        f"{row['tags.model']} {row['run_id'][:12]} ({row['start_time']:%Y-%m-%d})"
        for _, row in frame.iterrows()
    )
    text = findings.shift_markdown(shift_metrics())
    title, _, body = text.partition("\n")
    note = f"{provenance()} The `task1-shift` runs it describes: {runs or 'none yet'}."
    path.write_text(f"{title}\n\n{note}\n{body}")
    return path


def build_report(
    out: str | Path | None = None, ensemble_k: int = 0, tta: bool = False
) -> tuple[Path, pd.DataFrame]:
    """Write comparison.md/.csv/.png into `out` and log them to a `report` run.

    `ensemble_k` > 0 adds the ensemble rows (best k of each TEST2 step, and all
    Task 2 labelled runs together), `tta` their test-time-augmented twins. The
    Task 1 section comes from the `task1-shift` runs. An empty store is an
    error: nothing is written and no `report` run is made; so is a negative `ensemble_k`.
    """
    if ensemble_k < 0:
        raise ValueError(
            f"--ensemble {ensemble_k}: K must be 0 (no ensemble rows) or more; nothing written"
        )
    cells = collect()
    if cells["accuracy"].isna().all():
        raise RuntimeError(
            f"no finished study in the tracking store {config.mask_secrets(config.tracking_uri())}: "
            "run `make reproduce` (or a step's make target) first"
        )
    out_dir = config.reports_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensembles = []
    sizes, sets, test2_cache = eval_sets()
    cells = uncertainty.add_uncertainty(cells, sizes, sets)
    test2 = load_split("TEST2", config.data_dir(), config.cache_dir())
    if ensemble_k > 0:
        tta_options = (False, True) if tta else (False,)
        ensembles = ensemble.run_ensembles(ensemble_k, tta_options, test2, test2_cache)
    frame = ensemble.to_frame(ensembles)
    shift = shift_metrics()
    figure = out_dir / "figures" / "label_efficiency.png"
    has_figure = findings.plot_label_efficiency(shift, figure)
    champion_lines, champions = champions_markdown(test2_cache, tta)
    title_line, _, body = to_markdown(cells).partition("\n")
    headline, details_heading, details = body.partition("## Details per cell")
    text = "\n".join(
        [
            title_line,
            "",
            provenance(),
            headline.rstrip("\n"),
            *champion_lines,
            (details_heading + details).rstrip("\n"),
            *findings.search_conditions(cells, len(MODELS)),
            *ensembles_markdown(frame),
            *findings.task2_section(cells, frame),
            *findings.task1_section(shift, "figures/label_efficiency.png" if has_figure else None),
        ]
    )
    (out_dir / "comparison.md").write_text(text + "\n")
    cells.to_csv(out_dir / "comparison.csv", index=False)
    champions.to_csv(out_dir / "champions.csv", index=False)
    forest_plot(forest_rows(cells), out_dir / "comparison.png")
    if out_dir.resolve() == (config.PROJECT_ROOT / "reports").resolve():  # the README's own
        update_readme(config.PROJECT_ROOT / "README.md", headline_table(cells))
    written = ["comparison.md", "comparison.csv", "comparison.png", "champions.csv"]
    if ensembles:
        frame.drop(columns="members_text").to_csv(out_dir / "ensembles.csv", index=False)
        written.append("ensembles.csv")
    _log_report(out_dir, written, figure if has_figure else None, cells, ensembles, ensemble_k, tta)
    return out_dir, cells


def _log_report(out_dir, written, figure, cells, ensembles, ensemble_k, tta) -> None:
    experiment = store.experiment_id(REPORT_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=experiment, run_name="report", tags=store.environment_tags()
    ):
        for name in written:
            mlflow.log_artifact(str(out_dir / name))
        if figure is not None:
            mlflow.log_artifact(str(figure), artifact_path="figures")
        mlflow.log_metric("cells_filled", int(cells["accuracy"].notna().sum()))
        mlflow.log_params({"ensemble_k": ensemble_k, "tta": tta})
        mlflow.log_metrics(ensemble.summary(ensembles))
        for r in ensembles:
            mlflow.set_tag(f"members.{r.name}", ensemble.members_text(r.members)[:4000])


def row_text(step_name: str, cells: pd.DataFrame | None = None) -> str:
    """One step's row as a line of text, for the make targets."""
    cells = collect() if cells is None else cells
    row = cells[cells["step"] == step_name]
    parts = [
        f"{c['model']} {_fmt(c['accuracy']) or '—'}"
        + (f" (ref {_fmt(c['reference'], 2)})" if pd.notna(c["reference"]) else "")
        for _, c in row.iterrows()
    ]
    return f"{STEPS[step_name].row_label}: " + ", ".join(parts)
