"""The report's numbers with their uncertainty, end to end on a tiny store: each cell's 95 %
interval is Wilson's on its evaluation images, the seeds are counted, the searched final is
tested against its baseline on the same images, and the forest plot shows the CSV's numbers."""

from __future__ import annotations

import re

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


INTERVAL = re.compile(r"^(\d\.\d{4}) \[(\d\.\d{4}), (\d\.\d{4})\]$")


def _shown_interval(text: str, n: int) -> None:
    """`text` is 'acc [low, high]', and [low, high] is the Wilson interval of acc on n images."""
    found = INTERVAL.match(text.strip())
    assert found, f"no 95 % interval in {text!r}"
    acc, low, high = (float(v) for v in found.groups())
    expected = accuracy_interval(round(acc * n), n)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=6e-5), text


def _table(text: str, heading: str) -> pd.DataFrame:
    """The first markdown table under `heading` as strings."""
    block = text[text.index(heading) :].split("\n\n| ", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in ("| " + block).splitlines()]
    return pd.DataFrame(rows[2:], columns=rows[0])


def _check_every_accuracy_has_an_interval(reported):
    """The champions, the candidates, the details and the A/B: every accuracy shown with its
    95 % Wilson interval, its width that of a binomial on the images it rests on."""
    from data_tools import SELECTION, load_split
    from experiments.core import config

    out, cells = reported
    text = (out / "comparison.md").read_text()
    n_test2 = len(load_split("TEST2", config.data_dir(), config.cache_dir()).labels)
    n_select = len(load_split(SELECTION, config.data_dir(), config.cache_dir()).labels)
    task2 = re.search(r"\*\*Task 2\*\*.*?selection accuracy (.*?\]) .*?\*\*TEST2 (.*?\])\*\*", text)
    assert task2, "the Task 2 champion line gives no intervals"
    _shown_interval(task2.group(1), n_select)
    _shown_interval(task2.group(2), n_test2)
    candidates = _table(text, "### Task 2 candidates")
    for value in candidates["selection_acc (SELECT2)"]:
        _shown_interval(value, n_select)
    measured = [v for v in candidates["TEST2_acc (measured after)"] if v != "—"]
    assert measured
    for value in measured:
        _shown_interval(value, n_test2)
    details = _table(text, "## Details per cell")
    filled = details[details["accuracy [95 %]"] != "—"]  # the models this store ran
    assert len(filled) == 3
    for _, row in filled.iterrows():
        _shown_interval(row["accuracy [95 %]"], int(row["images"]))
    vgg = filled[filled["step"] == "task1-step1"].iloc[0]
    for half in ("black half [95 %]", "white half [95 %]"):
        assert INTERVAL.match(vgg[half]), vgg[half]
    _shown_interval(vgg["selection (validation) [95 %]"], int(vgg["validation images"]))
    ab = _table(text, "## Searched against the hand-set defaults")
    for column in ("baseline_acc [95 %]", "searched_acc [95 %]"):
        for _, row in ab.iterrows():
            n = (
                n_test2
                if row["step"].startswith("task2")
                else int(cells.loc[(row["step"], row["model"]), "n_images"])
            )
            _shown_interval(row[column], n)


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
    # the cpu budget trains no baseline: the best trial against trial 0, at trial fidelity
    tags = parent.data.tags
    assert tags["ab_fidelity"] == "trial" and cell["ab_fidelity"] == "trial"
    assert runs_in("task2-step3", "tags.role = 'baseline'") == []
    test2 = load_split("TEST2", config.data_dir(), config.cache_dir())
    correct = {
        role: probabilities(load_checkpoint(tags[f"ab_{role}_run"]), test2.images).argmax(1).numpy()
        == test2.labels.numpy()
        for role in ("searched", "baseline")
    }
    expected = mcnemar_exact(correct["searched"], correct["baseline"])
    assert cell["vs_baseline_p"] == pytest.approx(expected.p_value)
    assert cell["vs_baseline_diff"] == pytest.approx(expected.difference)
    assert cell["vs_baseline"] == expected.verdict
    from experiments.core.statistics import p_text as _p_text

    out, _ = reported  # the markdown row shows the same test, p never rounded to zero
    section = (out / "comparison.md").read_text().split("## Searched against the hand-set")[1]
    row = next(line for line in section.splitlines() if line.startswith("| task2-step3 | vgg"))
    cols = [part.strip() for part in row.split("|")]
    assert f"{expected.difference:+.4f}" in cols and _p_text(expected.p_value) in cols


def test_a_p_value_is_shown_with_its_digits_and_never_as_zero():
    from experiments.core.statistics import p_text as _p_text

    assert _p_text(1.234e-05) == "1.23e-05" and _p_text(0.04567) == "0.0457"
    assert _p_text(0.0) == "< 1e-10" and _p_text(float("nan")) == ""


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
    _check_every_accuracy_has_an_interval(reported)
    _check_seeds(reported)
    _check_versus_baseline(reported)
    _check_forest(reported)
