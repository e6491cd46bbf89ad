"""The comparison report: the best run of every study, side by side with the reference table.

Reads MLflow only (`search_runs` filtered by tags, sorted on summary metrics,
never on `metrics.X` last-step values). For each (step, model) cell it takes
the study's `final` run (the best COMPLETE trial retrained on the whole
training split); a study without one falls back to its best trial. Missing
studies are empty cells, not errors.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from experiments import config, tracking  # noqa: E402
from experiments.steps import STEPS, Step, training_step  # noqa: E402

MODEL_COLUMNS = ("vgg", "resnet", "efficientnet", "hybrid")
COLUMN_TITLES = {
    "vgg": "VGG",
    "resnet": "ResNet",
    "efficientnet": "EfficientNet",
    "hybrid": "VGG+ResNet",
}
REPORT_EXPERIMENT = "report"

# TASKS.md, reference notebooks: accuracy on the evaluation set
REFERENCE: dict[str, dict[str, float]] = {
    "task1-step1": {"vgg": 0.59, "resnet": 0.57, "efficientnet": 0.57, "hybrid": 0.57},
    "task1-step2": {"vgg": 0.53, "resnet": 0.55, "efficientnet": 0.54, "hybrid": 0.57},
    "task2-step1": {"vgg": 0.22, "resnet": 0.19, "efficientnet": 0.15, "hybrid": 0.14},
    "task2-step2": {"vgg": 0.96, "resnet": 0.92, "efficientnet": 0.95, "hybrid": 0.97},
    "task2-step3": {"vgg": 0.96, "resnet": 0.96, "efficientnet": 0.96, "hybrid": 0.97},
}


@dataclass
class Cell:
    step: str
    model: str
    accuracy: float | None = None
    black_acc: float | None = None
    white_acc: float | None = None
    best_val_acc: float | None = None
    trials: int | None = None
    run_id: str = ""
    source: str = ""  # final | best-trial

    @property
    def reference(self) -> float | None:
        return REFERENCE.get(self.step, {}).get(self.model)

    @property
    def delta(self) -> float | None:
        if self.accuracy is None or self.reference is None:
            return None
        return self.accuracy - self.reference


def _find_cell(client: MlflowClient, step: Step, model: str) -> Cell:
    cell = Cell(step.name, model)
    source = training_step(step.name)
    experiment = client.get_experiment_by_name(source.name)
    if experiment is None:
        return cell
    study = f"{source.name}/{model}"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.study = '{study}' AND tags.role = 'final' AND tags.state = 'COMPLETE'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    cell.source = "final"
    if not runs:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.study = '{study}' AND tags.role = 'trial' AND tags.state = 'COMPLETE'",
            order_by=["metrics.best_val_acc DESC", "attributes.start_time ASC"],
            max_results=1,
        )
        cell.source = "best-trial"
    if not runs:
        return Cell(step.name, model)
    run = runs[0]
    metrics = run.data.metrics
    eval_set = step.primary_eval
    cell.accuracy = metrics.get(f"{eval_set}_acc")
    cell.black_acc = metrics.get(f"{eval_set}_black_acc")
    cell.white_acc = metrics.get(f"{eval_set}_white_acc")
    cell.best_val_acc = metrics.get("best_val_acc")
    cell.run_id = run.info.run_id
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.study = '{study}' AND tags.role = 'study'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if parents:
        counts = parents[0].data.metrics
        cell.trials = int(counts.get("trials_complete", 0) + counts.get("trials_pruned", 0))
    return cell


def collect(models: tuple[str, ...] = MODEL_COLUMNS) -> list[list[Cell]]:
    """One row of cells per declared step."""
    tracking.init()
    client = MlflowClient()
    return [[_find_cell(client, step, model) for model in models] for step in STEPS.values()]


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def to_markdown(rows: list[list[Cell]]) -> str:
    models = [cell.model for cell in rows[0]]
    header = "| trained / evaluated | " + " | ".join(COLUMN_TITLES.get(m, m) for m in models) + " |"
    rule = "|---" * (len(models) + 1) + "|"
    lines = [
        "# Comparison: best run of every study",
        "",
        "Each cell: evaluation accuracy of the study's final run (its best COMPLETE trial, by",
        "validation accuracy on the training set's split, retrained on the whole split);",
        "in brackets the reference notebooks' number and the difference. Empty: no study yet.",
        "",
        header,
        rule,
    ]
    for row in rows:
        step = STEPS[row[0].step]
        cells = []
        for cell in row:
            if cell.accuracy is None:
                cells.append("")
            else:
                reference = (
                    f" ({_fmt(cell.reference, 2)}, {_fmt(cell.delta, 3, True)})"
                    if cell.reference is not None
                    else ""
                )
                cells.append(f"**{_fmt(cell.accuracy)}**{reference}")
        lines.append(f"| {step.row_label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Details per cell",
        "",
        "| step | model | eval acc | black half | white half | best val acc | trials | run | from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for cell in row:
            lines.append(
                f"| {cell.step} | {cell.model} | {_fmt(cell.accuracy, 4)} | {_fmt(cell.black_acc, 4)} "
                f"| {_fmt(cell.white_acc, 4)} | {_fmt(cell.best_val_acc, 4)} | {cell.trials or ''} "
                f"| {cell.run_id[:12]} | {cell.source if cell.accuracy is not None else ''} |"
            )
    lines += ["", "## Steps", ""]
    for step in STEPS.values():
        reuse = f" Cells come from the {step.reuses} studies." if step.reuses else ""
        lines.append(
            f"- **{step.name}** ({step.row_label}): {step.description}. Labels read: {step.label_use}.{reuse}"
        )
    return "\n".join(lines) + "\n"


def write_csv(rows: list[list[Cell]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "step",
                "row",
                "model",
                "accuracy",
                "reference",
                "delta",
                "black_acc",
                "white_acc",
                "best_val_acc",
                "trials",
                "run_id",
                "source",
            ]
        )
        for row in rows:
            for c in row:
                writer.writerow(
                    [
                        c.step,
                        STEPS[c.step].row_label,
                        c.model,
                        c.accuracy,
                        c.reference,
                        c.delta,
                        c.black_acc,
                        c.white_acc,
                        c.best_val_acc,
                        c.trials,
                        c.run_id,
                        c.source,
                    ]
                )


def plot_heatmap(rows: list[list[Cell]], path: Path) -> None:
    values = np.array([[np.nan if c.accuracy is None else c.accuracy for c in row] for row in rows])
    fig, ax = plt.subplots(figsize=(8.5, 1.5 + 0.55 * len(rows)))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(rows[0])), [COLUMN_TITLES.get(c.model, c.model) for c in rows[0]])
    ax.set_yticks(range(len(rows)), [STEPS[row[0].step].row_label for row in rows])
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            text = "—" if cell.accuracy is None else f"{cell.accuracy:.3f}"
            if cell.accuracy is not None and cell.reference is not None:
                text += f"\n(ref {_fmt(cell.reference, 2)})"
            color = "black" if cell.accuracy is not None and cell.accuracy > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_title("evaluation accuracy of each study's best run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ensembles_markdown(results) -> list[str]:
    from experiments.ensemble import members_text

    if not results:
        return []
    lines = [
        "",
        "## Ensembles and test-time augmentation (TEST2)",
        "",
        "Softmax averages of final runs. *best k*: a step's k final runs with the highest",
        "validation accuracy on that step's own split; *all*: every final run of the Task 2 steps",
        "that train on labelled TEST images, a rule fixed in advance. TEST2 labels only score.",
        "TTA: each member averaged over the image and its four one-pixel shifts.",
        "",
        "| ensemble | k | TTA | TEST2 acc | members |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {len(r.members)} | {'yes' if r.tta else 'no'} "
            f"| **{_fmt(r.accuracy, 4)}** | {members_text(r.members)} |"
        )
    return lines


def write_ensembles_csv(results, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ensemble", "k", "tta", "eval_set", "accuracy", "members"])
        for r in results:
            writer.writerow(
                [
                    r.name,
                    len(r.members),
                    r.tta,
                    r.eval_set,
                    r.accuracy,
                    " ".join(f"{m.step}/{m.model}:{m.run_id}" for m in r.members),
                ]
            )


def build_report(
    out: str | Path | None = None, ensemble_k: int = 0, tta: bool = False
) -> tuple[Path, list[list[Cell]]]:
    """Write comparison.md/.csv/.png into `out` and log them to a `report` run.

    `ensemble_k` > 0 adds the ensemble rows (best k of each TEST2 step, and all
    Task 2 labelled runs together), `tta` their test-time-augmented twins. The
    Task 1 section comes from the `task1-shift` runs.
    """
    from experiments import ensemble, findings

    out_dir = config.reports_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect()
    client = MlflowClient()
    ensembles = []
    if ensemble_k > 0:
        from data_tools import load_split

        test2 = load_split("TEST2", config.data_dir(), config.cache_dir())
        ensembles = ensemble.run_ensembles(ensemble_k, (False, True) if tta else (False,), test2)
    shift = findings.shift_runs(client)
    figure = out_dir / "figures" / "label_efficiency.png"
    has_figure = findings.plot_label_efficiency(shift, figure)
    text = "\n".join(
        [
            to_markdown(rows).rstrip("\n"),
            *ensembles_markdown(ensembles),
            *findings.task2_section(rows, ensembles),
            *findings.task1_section(shift, "figures/label_efficiency.png" if has_figure else None),
        ]
    )
    (out_dir / "comparison.md").write_text(text + "\n")
    write_csv(rows, out_dir / "comparison.csv")
    plot_heatmap(rows, out_dir / "comparison.png")
    written = ["comparison.md", "comparison.csv", "comparison.png"]
    if ensembles:
        write_ensembles_csv(ensembles, out_dir / "ensembles.csv")
        written.append("ensembles.csv")
    experiment = tracking.experiment_id(REPORT_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=experiment, run_name="report", tags=tracking.environment_tags()
    ):
        for name in written:
            mlflow.log_artifact(str(out_dir / name))
        if has_figure:
            mlflow.log_artifact(str(figure), artifact_path="figures")
        filled = sum(c.accuracy is not None for row in rows for c in row)
        mlflow.log_metric("cells_filled", filled)
        mlflow.log_params({"ensemble_k": ensemble_k, "tta": tta})
        mlflow.log_metrics(ensemble.finite(ensemble.summary(ensembles)))
        for r in ensembles:
            mlflow.set_tag(f"members.{r.name}", ensemble.members_text(r.members)[:4000])
    return out_dir, rows


def row_text(step_name: str, rows: list[list[Cell]] | None = None) -> str:
    """One step's row as a line of text, for the make targets."""
    rows = rows or collect()
    row = next(r for r in rows if r[0].step == step_name)
    parts = [
        f"{c.model} {_fmt(c.accuracy) or '—'}"
        + (f" (ref {_fmt(c.reference, 2)})" if c.reference is not None else "")
        for c in row
    ]
    return f"{STEPS[step_name].row_label}: " + ", ".join(parts)
