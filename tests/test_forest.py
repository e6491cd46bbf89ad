"""The forest plot draws exactly the numbers of its rows: read back from the Figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.reporting.forest import (
    ACC_GID,
    INTERVAL_GID,
    REFERENCE_GID,
    SEEDS_GID,
    XLABEL,
    draw_forest,
    forest_data,
    forest_plot,
)


def _rows() -> pd.DataFrame:
    """Two steps, one cell without a result (dropped), seeds on some cells, one reference NaN."""
    nan = float("nan")
    return pd.DataFrame(
        {
            "step": ["task1-step1", "task1-step1", "task2-step3", "task2-step3", "task2-step3"],
            "model": ["vgg", "resnet", "vgg", "hybrid", "efficientnet"],
            "acc": [0.563, 0.497, 0.9861, 0.9893, nan],
            "acc_low": [0.5504, 0.4843, 0.9829, 0.9864, nan],
            "acc_high": [0.5755, 0.5097, 0.9888, 0.9917, nan],
            "seed_values": [(), None, (0.9840, 0.9858, 0.9885), [0.9893], ()],
            "reference": [0.59, nan, 0.97, 0.98, 0.99],
        }
    )


def _artist(ax, gid: str):
    found = [artist for artist in ax.get_children() if artist.get_gid() == gid]
    assert len(found) <= 1, gid
    return found[0] if found else None


def _plotted(figure) -> pd.DataFrame:
    """The numbers the Figure shows, one row per point, read from its artists."""
    records = []
    for ax in figure.axes:
        if not ax.get_title(loc="left"):
            continue
        cells = [label.get_text() for label in ax.get_yticklabels()]
        x, y = _artist(ax, ACC_GID).get_data()
        bars = {
            round(seg[0][1]): (seg[0][0], seg[1][0])
            for seg in _artist(ax, INTERVAL_GID).get_segments()
        }
        marks = _artist(ax, REFERENCE_GID)
        references = {} if marks is None else {round(yy): xx for xx, yy in marks.get_offsets()}
        dots = _artist(ax, SEEDS_GID)
        seeds: dict[int, list[float]] = {}
        for xx, yy in [] if dots is None else dots.get_offsets():
            seeds.setdefault(round(yy), []).append(float(xx))
        for position, (acc, row) in enumerate(zip(x, y, strict=True)):
            assert row == position
            records.append(
                {
                    "step": ax.get_title(loc="left"),
                    "cell": cells[position],
                    "acc": float(acc),
                    "low": float(bars[position][0]),
                    "high": float(bars[position][1]),
                    "reference": float(references.get(position, math.nan)),
                    "seeds": tuple(seeds.get(position, ())),
                }
            )
    return pd.DataFrame(records)


def test_forest_data_holds_the_rows_numbers_and_drops_empty_cells():
    data = forest_data(_rows())
    assert data["cell"].to_list() == ["vgg", "resnet", "vgg", "hybrid"]
    assert data["acc"].to_list() == [0.563, 0.497, 0.9861, 0.9893]
    assert data["low"].to_list() == [0.5504, 0.4843, 0.9829, 0.9864]
    assert data["seeds"].to_list() == [(), (), (0.9840, 0.9858, 0.9885), (0.9893,)]
    assert math.isnan(data.loc[1, "reference"]) and data.loc[0, "reference"] == 0.59


def test_the_plot_shows_exactly_the_rows_numbers(tmp_path):
    rows = _rows()
    figure = draw_forest(rows)
    plotted = _plotted(figure)
    expected = forest_data(rows)
    pd.testing.assert_frame_equal(plotted, expected, check_exact=False, rtol=0, atol=1e-12)
    kept = rows[rows["acc"].notna()]
    np.testing.assert_allclose(plotted["acc"], kept["acc"], atol=1e-12)
    np.testing.assert_allclose(plotted["low"], kept["acc_low"], atol=1e-12)
    np.testing.assert_allclose(plotted["high"], kept["acc_high"], atol=1e-12)
    assert [ax.get_title(loc="left") for ax in figure.axes] == ["task1-step1", "task2-step3"]
    assert figure.axes[-1].get_xlabel() == XLABEL == "accuracy (95 % interval)"
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [
        "accuracy, 95 % interval",
        "seed",
        "original study",
    ]
    forest_plot(rows, tmp_path / "figures" / "comparison.png")
    png = tmp_path / "figures" / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_plot_reads_the_csvs_seeds_and_cell_column(tmp_path):
    rows = _rows().rename(columns={"model": "cell"})
    path = tmp_path / "comparison.csv"
    rows.to_csv(path, index=False)
    read = pd.read_csv(path)  # tuples come back as text such as "(0.984, 0.9858, 0.9885)"
    plotted = _plotted(draw_forest(read))
    assert plotted["seeds"].to_list() == forest_data(rows)["seeds"].to_list()
    assert plotted["acc"].to_list() == pytest.approx(rows["acc"].dropna().to_list(), abs=1e-12)


def test_the_plot_refuses_rows_without_a_result():
    rows = _rows().assign(acc=float("nan"))
    with pytest.raises(ValueError):
        draw_forest(rows)
    with pytest.raises(ValueError, match="acc_high"):
        forest_data(_rows().drop(columns="acc_high"))
