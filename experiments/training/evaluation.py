"""Scoring a trained model on an evaluation set, and the figures of a run.

Metrics come from scikit-learn. Names: `<SET>_acc`, `<SET>_macro_f1`,
`<SET>_{precision,recall,f1}_<label 1..6>`, and for a set that holds both
backgrounds (TEST) `<SET>_black_acc` and `<SET>_white_acc`. Every accuracy comes
with its 95 % Wilson interval over the images and the image count:
`<name>_acc_ci_low`, `<name>_acc_ci_high` and `<name>_n` (experiments.core.statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402
from torch import nn  # noqa: E402

from data_tools import NUM_CLASSES, Dataset  # noqa: E402
from experiments.core.preprocess import Preprocessing  # noqa: E402
from experiments.core.statistics import accuracy_interval  # noqa: E402
from experiments.training.inference import predict_logits  # noqa: E402


@dataclass
class Evaluation:
    name: str
    labels: np.ndarray
    predictions: np.ndarray
    white: np.ndarray
    metrics: dict[str, float]
    confusion: np.ndarray
    probabilities: np.ndarray | None = None  # softmax, one row per image


def score(
    model: nn.Module, prep: Preprocessing, dataset: Dataset, device: torch.device
) -> Evaluation:
    """Predict every image of `dataset` (deterministic preprocessing only) and compute the metrics."""
    logits = predict_logits(model, prep.transform(dataset.images).to(device)).cpu()
    predictions = logits.argmax(1).numpy()
    labels = dataset.labels.numpy()
    white = dataset.white.numpy()
    return Evaluation(
        dataset.name,
        labels,
        predictions,
        white,
        *metrics_of(dataset.name, labels, predictions, white),
        probabilities=logits.softmax(1).numpy(),
    )


def accuracy_metrics(name: str, correct: np.ndarray) -> dict[str, float]:
    """`<name>_acc` of a boolean per-image array, its 95 % Wilson interval and `<name>_n`."""
    interval = accuracy_interval(int(correct.sum()), len(correct))
    return {
        f"{name}_acc": float(correct.mean()),
        f"{name}_acc_ci_low": interval.low,
        f"{name}_acc_ci_high": interval.high,
        f"{name}_n": float(len(correct)),
    }


def metrics_of(
    name: str, labels: np.ndarray, predictions: np.ndarray, white: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    classes = list(range(NUM_CLASSES))
    metrics = accuracy_metrics(name, labels == predictions)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    metrics[f"{name}_macro_f1"] = float(np.mean(f1))
    for label in classes:
        metrics[f"{name}_precision_{label + 1}"] = float(precision[label])
        metrics[f"{name}_recall_{label + 1}"] = float(recall[label])
        metrics[f"{name}_f1_{label + 1}"] = float(f1[label])
    if white.any() and (~white).any():
        metrics.update(accuracy_metrics(f"{name}_black", labels[~white] == predictions[~white]))
        metrics.update(accuracy_metrics(f"{name}_white", labels[white] == predictions[white]))
    return metrics, confusion_matrix(labels, predictions, labels=classes)


def halves_accuracy(name: str, correct: np.ndarray, white: np.ndarray) -> dict[str, float]:
    """`<name>_acc` over all images and over each background half (NaN for an empty half)."""
    nan = float("nan")
    return {
        f"{name}_acc": float(correct.mean()) if len(correct) else nan,
        f"{name}_black_acc": float(correct[~white].mean()) if (~white).any() else nan,
        f"{name}_white_acc": float(correct[white].mean()) if white.any() else nan,
    }


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    matrix = evaluation.confusion
    ax.imshow(matrix, cmap="Blues")
    ticks = range(NUM_CLASSES)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    for i in ticks:
        for j in ticks:
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{evaluation.name}: accuracy {evaluation.metrics[f'{evaluation.name}_acc']:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_misclassified(
    evaluation: Evaluation, dataset: Dataset, path: Path, count: int = 32
) -> Path:
    """A grid of misclassified images; for a mixed set, half from each background."""
    wrong = evaluation.predictions != evaluation.labels
    groups = [("", np.flatnonzero(wrong))]
    if evaluation.white.any() and (~evaluation.white).any():
        groups = [
            ("black bg", np.flatnonzero(wrong & ~evaluation.white)),
            ("white bg", np.flatnonzero(wrong & evaluation.white)),
        ]
    per_group = count // len(groups)
    chosen = [(tag, i) for tag, index in groups for i in index[:per_group]]
    cols = 8
    rows = max(1, int(np.ceil(len(chosen) / cols)))
    # one mosaic in one axes (a subplot per image costs ~2 s a figure): each tile an image
    # with a caption band above it, the unused tiles grey
    size, band, gap = dataset.images.shape[-1], 9, 2
    cell_h, cell_w = size + band + gap, size + gap
    mosaic = np.full((rows * cell_h, cols * cell_w), 0.5, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(cols * 1.2, rows * 1.4))
    for slot, (tag, i) in enumerate(chosen):
        top, left = (slot // cols) * cell_h + band, (slot % cols) * cell_w
        mosaic[top : top + size, left : left + size] = dataset.images[i, 0].numpy()
        caption = f"{evaluation.labels[i] + 1}->{evaluation.predictions[i] + 1} {tag}".strip()
        ax.text(left + size / 2, top - 1, caption, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    counts = ", ".join(f"{len(index)} {tag}".strip() for tag, index in groups)
    fig.suptitle(
        f"{evaluation.name}: misclassified (true->predicted); errors: {counts}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, style in (("train", "-"), ("val", "--")):
        loss_ax.plot(epochs, [row[f"{key}_loss"] for row in history], style, label=key)
        acc_ax.plot(epochs, [row[f"{key}_acc"] for row in history], style, label=key)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.axvline(best_epoch, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
