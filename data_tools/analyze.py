"""Data analysis: figures and a short summary of every raw dataset.

Writes into `<reports>/figures/`:
  samples_<SET>.png      15 images with their labels
  histogram.png          pixel-intensity histogram of each dataset
  class_means.png        the mean image of each class of each dataset
  background_split.png   black/white background counts of each dataset
and `<reports>/data_summary.md` with the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data_tools.datasets import NUM_CLASSES, Dataset, border_mean  # noqa: E402


def summarize(dataset: Dataset) -> dict:
    """The numbers of one dataset: counts per class, value range, background split."""
    images = dataset.images
    white = dataset.white
    ring = border_mean(images)
    return {
        "images": len(dataset),
        "per_class": torch.bincount(dataset.labels, minlength=NUM_CLASSES).tolist(),
        "dtype": str(images.dtype).replace("torch.", ""),
        "min": float(images.min()),
        "max": float(images.max()),
        "mean": float(images.mean()),
        "std": float(images.std()),
        "white_background": int(white.sum()),
        "black_background": int((~white).sum()),
        "border_mean_black_max": float(ring[~white].max()) if (~white).any() else None,
        "border_mean_white_min": float(ring[white].min()) if white.any() else None,
        "fingerprint": dataset.fingerprint[:16],
    }


def _samples(dataset: Dataset, path: Path, count: int = 15, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:count]
    fig, axes = plt.subplots(3, 5, figsize=(7.5, 5))
    for ax, i in zip(axes.flat, index.tolist(), strict=False):
        ax.imshow(dataset.images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"label {int(dataset.labels[i]) + 1}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{dataset.name}: {count} random samples (folder label)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histograms(datasets: Mapping[str, Dataset], path: Path) -> None:
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3), squeeze=False)
    for ax, (name, ds) in zip(axes[0], datasets.items(), strict=True):
        ax.hist(ds.images.flatten().numpy(), bins=64, range=(0, 1), log=True, color="tab:blue")
        ax.set_title(name)
        ax.set_xlabel("pixel intensity")
    axes[0][0].set_ylabel("pixels (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _class_means(datasets: Mapping[str, Dataset], path: Path) -> None:
    fig, axes = plt.subplots(
        len(datasets), NUM_CLASSES, figsize=(1.6 * NUM_CLASSES, 1.7 * len(datasets)), squeeze=False
    )
    for row, (name, ds) in enumerate(datasets.items()):
        for label in range(NUM_CLASSES):
            ax = axes[row][label]
            members = ds.images[ds.labels == label]
            if len(members):
                ax.imshow(members.mean(0)[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"label {label + 1}", fontsize=9)
            if label == 0:
                ax.set_ylabel(name)
    fig.suptitle("mean image per class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _background_split(summaries: Mapping[str, dict], path: Path) -> None:
    names = list(summaries)
    black = [summaries[n]["black_background"] for n in names]
    white = [summaries[n]["white_background"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, black, color="black", label="black background")
    ax.bar(
        names, white, bottom=black, color="lightgray", edgecolor="black", label="white background"
    )
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("background split (border rule)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary_markdown(summaries: Mapping[str, dict]) -> str:
    lines = [
        "# Data summary",
        "",
        "Written by `python -m data_tools analyze` (or `python -m experiments analyze`, which also logs it). Background rule: mean of the outermost",
        "pixel ring > 0.5 means a white background (`data_tools.is_white_background`).",
        "",
        "| dataset | images | per class (labels 1..6) | range | mean | std | black bg | white bg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        per_class = " / ".join(map(str, s["per_class"]))
        lines.append(
            f"| {name} | {s['images']:,} | {per_class} | [{s['min']:.3f}, {s['max']:.3f}] "
            f"| {s['mean']:.3f} | {s['std']:.3f} | {s['black_background']:,} | {s['white_background']:,} |"
        )
    lines += [
        "",
        "Border-ring means, showing how far the two backgrounds sit from the threshold:",
        "",
    ]

    def ring(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    for name, s in summaries.items():
        lines.append(
            f"- {name}: black backgrounds up to {ring(s['border_mean_black_max'])}, "
            f"white backgrounds from {ring(s['border_mean_white_min'])} (fingerprint {s['fingerprint']})"
        )
    return "\n".join(lines) + "\n"


def analyze(datasets: Mapping[str, Dataset], out_dir: Path) -> tuple[dict, list[Path]]:
    """Write the figures and the summary for `datasets`; return the summaries and written files."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(ds) for name, ds in datasets.items()}
    written = []
    for name, ds in datasets.items():
        path = figures / f"samples_{name}.png"
        _samples(ds, path)
        written.append(path)
    for filename, draw, source in (
        ("histogram.png", _histograms, datasets),
        ("class_means.png", _class_means, datasets),
        ("background_split.png", _background_split, summaries),
    ):
        draw(source, figures / filename)
        written.append(figures / filename)
    summary = out_dir / "data_summary.md"
    summary.write_text(_summary_markdown(summaries))
    written.append(summary)
    return summaries, written


def analyze_folders(
    root: Path, out_dir: Path, cache: Path | None = None
) -> tuple[dict, list[Path]]:
    """Load TRAIN, TEST and TEST2 from `root` (through the cache) and analyze them."""
    from data_tools.datasets import RAW_SPLITS, load_dataset
    from data_tools.paths import cache_dir

    datasets = {name: load_dataset(root / name, cache or cache_dir()) for name in RAW_SPLITS}
    return analyze(datasets, out_dir)
