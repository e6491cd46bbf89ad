"""The report's numbers with their uncertainty, end to end on a tiny store: each cell's 95 %
interval is Wilson's on its evaluation images, the seeds are counted, the searched final is
tested against its baseline on the same images, and the forest plot shows the CSV's numbers."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import runs_in
from test_forest import _plotted

from experiments.cli import main
from experiments.core.statistics import accuracy_interval, mcnemar_exact, seed_summary

TINY = ["--trials", "1", "--epochs", "1", "--final-epochs", "1", "--train-subset", "0"]


def _report(tmp_path):
    for step in ("task1-step1", "task2-step3"):
        assert main(["search", "--step", step, "--model", "vgg", *TINY]) == 0
    assert main(["seeds", "--step", "task2-step3", "--model", "vgg", "--seeds", "1"]) == 0
    out = tmp_path / "reports"
    assert main(["report", "--out", str(out), "--ensemble", "0"]) == 0
    cells = pd.read_csv(out / "comparison.csv")
    return out, cells[cells["accuracy"].notna()].set_index(["step", "model"])


def _check_intervals(reported):
    from data_tools import load_split
    from experiments.core import config

    out, cells = reported
    sizes = {
        n: len(load_split(n, config.data_dir(), config.cache_dir()).labels)
        for n in ("TEST", "TEST2")
    }
    assert set(cells.index) >= {
        ("task1-step1", "vgg"),
        ("task2-step3", "vgg"),
        ("task2-step1", "vgg"),
    }
    for (step, _), cell in cells.iterrows():
        n = sizes["TEST" if step == "task1-step1" else "TEST2"]
        expected = accuracy_interval(round(cell["accuracy"] * n), n)
        assert cell["n_images"] == n
        assert (cell["acc_low"], cell["acc_high"]) == pytest.approx((expected.low, expected.high))
        assert cell["acc_low"] <= cell["accuracy"] <= cell["acc_high"]
    black = cells.loc[("task1-step1", "vgg")]
    assert black["black_low"] <= black["black_acc"] <= black["black_high"]
    (final,) = runs_in("task2-step3", "tags.role = 'final'")
    metrics = final.data.metrics
    assert metrics["TEST2_n"] == sizes["TEST2"]
    assert metrics["TEST2_acc_ci_low"] <= metrics["TEST2_acc"] <= metrics["TEST2_acc_ci_high"]
    text = (out / "comparison.md").read_text()
    headline = text.index("## Headline")
    assert headline < text.index("## Champions") and headline < text.index("## Details per cell")


def _check_seeds(reported):
    out, cells = reported
    cell = cells.loc[("task2-step3", "vgg")]
    values = [float(v) for v in cell["seed_values"].strip("()").split(",") if v.strip()]
    assert cell["seeds"] == 2 and len(values) == 2
    assert values[0] == pytest.approx(cell["accuracy"], abs=1e-6)
    summary = seed_summary(values)
    assert cell["seed_mean"] == pytest.approx(summary.mean) and cell["seed_sd"] == pytest.approx(
        summary.sd
    )
    assert cell["estimate"] == pytest.approx(summary.mean)
    assert "(2 seeds)" in (out / "comparison.md").read_text()
    assert cells.loc[("task1-step1", "vgg"), "seeds"] == 1


def _check_versus_baseline(reported):
    from data_tools import load_split
    from experiments.core import config
    from experiments.training.checkpoint import load_checkpoint
    from experiments.training.inference import probabilities

    _, cells = reported
    cell = cells.loc[("task2-step3", "vgg")]
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    test2 = load_split("TEST2", config.data_dir(), config.cache_dir())
    correct = {
        role: probabilities(load_checkpoint(parent.data.tags[f"{role}_run"]), test2.images)
        .argmax(1)
        .numpy()
        == test2.labels.numpy()
        for role in ("final", "baseline")
    }
    expected = mcnemar_exact(correct["final"], correct["baseline"])
    assert cell["vs_baseline_p"] == pytest.approx(expected.p_value)
    assert cell["vs_baseline_diff"] == pytest.approx(expected.difference)
    assert cell["vs_baseline"] == expected.verdict


def _check_forest(reported):
    from experiments.reporting.forest import draw_forest
    from experiments.reporting.report import forest_rows

    out, _ = reported
    csv = pd.read_csv(out / "comparison.csv")
    assert (out / "comparison.png").stat().st_size > 0
    plotted = _plotted(draw_forest(forest_rows(csv)))
    filled = csv[csv["estimate"].notna()]
    assert sorted(plotted["acc"].round(9)) == sorted(filled["estimate"].round(9))
    assert sorted(plotted["low"].round(9)) == sorted(filled["estimate_low"].round(9))
    assert sorted(plotted["high"].round(9)) == sorted(filled["estimate_high"].round(9))


def test_the_report_gives_every_number_its_uncertainty(study_data, tmp_path):
    """One tiny store (two studies, a seed, a report), checked four ways: each part below is
    a function of its own so that a failure names what broke."""
    reported = _report(tmp_path)
    _check_intervals(reported)
    _check_seeds(reported)
    _check_versus_baseline(reported)
    _check_forest(reported)
