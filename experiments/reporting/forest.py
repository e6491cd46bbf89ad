"""The comparison as a forest plot: every cell's accuracy with its 95 % interval, its seeds as
dots and the original study's number as a marker, one panel per task step.

Input rows carry `step`, `cell` (or `model`), `acc`, `acc_low`, `acc_high`, and optionally
`seed_values` (a tuple or list of per-seed accuracies, or empty) and `reference` (the original
study's number, NaN when it has none). Rows without an accuracy are left out.
`forest_data` returns exactly the numbers `draw_forest` plots.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

XLABEL = "accuracy (95 % interval)"
LEGEND = ("accuracy, 95 % interval", "seed", "original study")
# gids of the plotted artists, so their numbers can be read back from the Figure
ACC_GID, INTERVAL_GID, SEEDS_GID, REFERENCE_GID = "acc", "interval", "seeds", "reference"


def _seeds(value: Any) -> tuple[float, ...]:
    """A cell's per-seed values: a tuple or list, a string such as "(0.98, 0.99)", or empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, str):
        value = [part for part in re.split(r"[\s,;()\[\]]+", value) if part]
    return tuple(float(v) for v in value)


def _number(value: Any) -> float:
    return float("nan") if value is None or pd.isna(value) else float(value)


def forest_data(rows: pd.DataFrame) -> pd.DataFrame:
    """The plotted numbers, one row per point: step, cell, acc, low, high, reference, seeds.

    Steps and cells keep the input's order; rows whose `acc` is missing are dropped.
    """
    cell = "cell" if "cell" in rows.columns else "model"
    missing = [c for c in ("step", cell, "acc", "acc_low", "acc_high") if c not in rows.columns]
    if missing:
        raise ValueError(f"forest rows lack column(s) {missing}")
    kept = rows[rows["acc"].notna()]
    return pd.DataFrame(
        {
            "step": kept["step"].astype(str).to_list(),
            "cell": kept[cell].astype(str).to_list(),
            "acc": kept["acc"].astype(float).to_list(),
            "low": [_number(v) for v in kept["acc_low"]],
            "high": [_number(v) for v in kept["acc_high"]],
            "reference": [_number(v) for v in kept.get("reference", [None] * len(kept))],
            "seeds": [_seeds(v) for v in kept.get("seed_values", [None] * len(kept))],
        }
    )


def draw_forest(rows: pd.DataFrame) -> Figure:
    """The forest plot as a Figure: one panel per step, one row per cell, top to bottom."""
    data = forest_data(rows)
    if data.empty:
        raise ValueError("no cell has an accuracy to plot")
    steps = list(dict.fromkeys(data["step"]))
    sizes = [int((data["step"] == step).sum()) for step in steps]
    figure = Figure(figsize=(7, 0.9 * len(steps) + 0.32 * len(data) + 0.8), layout="constrained")
    axes = figure.subplots(len(steps), 1, squeeze=False, height_ratios=sizes)[:, 0]
    for ax, step in zip(axes, steps, strict=True):
        panel = data[data["step"] == step]
        y = np.arange(len(panel), dtype=float)
        acc = panel["acc"].to_numpy()
        low = panel["low"].fillna(panel["acc"]).to_numpy()  # no interval: no bar
        high = panel["high"].fillna(panel["acc"]).to_numpy()
        bars = ax.errorbar(
            acc, y, xerr=[acc - low, high - acc], fmt="o", color="C0", ecolor="C0", capsize=3
        )
        bars.lines[0].set_gid(ACC_GID)
        bars.lines[2][0].set_gid(INTERVAL_GID)
        seed_x = [value for seeds in panel["seeds"] for value in seeds]
        seed_y = [row for row, seeds in zip(y, panel["seeds"], strict=True) for _ in seeds]
        if seed_x:
            dots = ax.scatter(seed_x, seed_y, s=10, color="0.35", zorder=3)
            dots.set_gid(SEEDS_GID)
        has_reference = panel["reference"].notna().to_numpy()
        if has_reference.any():
            marks = ax.scatter(
                panel["reference"].to_numpy()[has_reference],
                y[has_reference],
                marker="D",
                s=30,
                facecolor="none",
                edgecolor="C3",
                zorder=4,
            )
            marks.set_gid(REFERENCE_GID)
        ax.set_yticks(y, panel["cell"].to_list())
        ax.set_ylim(len(panel) - 0.5, -0.5)  # first cell on top
        ax.set_title(step, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(XLABEL)
    handles = [
        Line2D([], [], color="C0", marker="o"),
        Line2D([], [], color="0.35", marker="o", markersize=3, linestyle=""),
        Line2D([], [], color="C3", marker="D", markerfacecolor="none", linestyle=""),
    ]
    figure.legend(handles, LEGEND, loc="outside lower center", ncols=3, frameon=False)
    return figure


def forest_plot(rows: pd.DataFrame, path: str | Path) -> None:
    """Draw the forest plot of `rows` (see `draw_forest`) into the image file `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_forest(rows).savefig(path, dpi=150)
