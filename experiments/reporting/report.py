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
from experiments.core.statistics import p_text
from experiments.core.steps import STEPS, training_step  # noqa: E402
from experiments.reporting import findings, uncertainty
from experiments.reporting.champions import SHIFT_EXPERIMENT, champions_markdown, shift_metrics
from experiments.reporting.forest import forest_plot
from experiments.tracking import results, store
from experiments.training.checkpoint import load_checkpoint  # noqa: E402
from experiments.training.inference import ProbabilityCache  # noqa: E402
from models import MODELS, title  # noqa: E402

REPORT_EXPERIMENT = "report"
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
            "searched - baseline": frame["vs_baseline_diff"].map(
                lambda v: "" if pd.isna(v) else f"{v:+.4f}"
            ),
            "95 % interval": interval,
            "p": frame["vs_baseline_p"].map(p_text),
            "verdict": frame["vs_baseline"],
            "test": frame["vs_baseline_test"],
            "fidelity": _get(frame, "ab_fidelity"),
            "selected": frame["selected"],
        }
    )


HEADLINE_NOTE = (
    "Each cell: evaluation accuracy of the study's answer: its best COMPLETE trial retrained\n"
    "on the whole training split (where the budget also trains a baseline, the hand-set\n"
    "defaults trained the same way, whichever of the two has the higher validation\n"
    "accuracy). In square brackets its 95 % interval:\n"
    "Wilson over the evaluation images (6,000 per set); for a cell with several seeds\n"
    "(`make seeds`) the mean ± sd over seeds, the interval widened by the seed sd. In round\n"
    "brackets the reference notebooks' number: *within noise* when it lies inside the\n"
    "interval, else *above* / *below* (this study's number against it). docs/statistics.md\n"
    "says what each interval and test means."
)
AB_NOTE = (
    "Every study compares its searched settings with its model's hand-set defaults (its\n"
    "trial 0) at one fidelity (*fidelity*). *final*: the defaults trained exactly like the\n"
    "final (`role=baseline`), *searched* the best trial retrained, and the study's answer\n"
    "(the cell above) is whichever of the two has the higher validation accuracy on the\n"
    "full validation split (*selected*). *trial* (budgets that train no baseline): the\n"
    "best trial against trial 0, both at trial fidelity, and the answer is the final.\n"
    "Evaluation accuracy on the step's evaluation set; measured after the fact, never\n"
    "used to choose.\n"
    "The paired test runs on the same evaluation images: exact McNemar on the images the\n"
    "two runs disagree on (a t-test over seeds where both have several); its interval is a\n"
    "paired bootstrap of the difference. *better* / *worse*: p < 0.05; otherwise *no\n"
    "detectable difference*."
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
        HEADLINE_NOTE
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
        _missing_as_none(details).to_markdown(index=False, missingval="—", disable_numparse=True),
        "",
        "## Searched against the hand-set defaults",
        "",
        AB_NOTE,
        "",
        _missing_as_none(baselines).to_markdown(index=False, missingval="—", disable_numparse=True)
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
    cells = _cells_to_report(ensemble_k)
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


def _cells_to_report(ensemble_k: int) -> pd.DataFrame:
    """Every cell of the store; an error, before anything is written, on a negative
    `ensemble_k` or a store with no finished study."""
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
    return cells


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
