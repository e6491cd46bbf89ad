"""The report's generated prose: each verdict is tested on the numbers that choose it."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.analysis.ensemble import EnsembleResult, Member, to_frame
from experiments.reporting.findings import (
    plot_label_efficiency,
    search_conditions,
    shift_markdown,
    task1_section,
    task2_section,
)


def _shift(white_after: float, white_before: float = 0.12, **changes) -> dict:
    values = {
        "TEST_acc": 0.55,
        "TEST_black_acc": 0.96,
        "TEST_white_acc": white_before,
        "auroc_background": 1.0,
        "auroc_max_softmax": 0.9,
        "auroc_energy": 0.88,
        "auroc_mahalanobis": 0.97,
        "coverage_mahalanobis": 0.5,
        "coverage_max_softmax": 0.6,
        "selective_acc_max_softmax": 0.8,
        "selective_acc_mahalanobis": 0.95,
        "new_script_accepted_mahalanobis": 0.03,
        "selftrain_TEST_acc": 0.56,
        "selftrain_white_acc": white_after,
        "selftrain_round0_pseudo_white_acc": 0.2,
        "selftrain_round0_pseudo_labelled": 60.0,
        "kmeans_new_purity": 0.4,
    }
    for k, acc in zip((1, 5, 20, 100), (0.3, 0.5, 0.7, 0.85), strict=True):
        values[f"k{k}_TEST_rest_acc"] = 0.5 + acc / 2
        values[f"k{k}_white_rest_acc"] = acc
        values[f"k{k}_black_rest_acc"] = 0.95
    values.update(changes)
    return {"vgg": values}


def _adaptation_line(shift: dict) -> str:
    return next(line for line in task1_section(shift, None) if "Unsupervised adaptation" in line)


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        (0.12, 0.30, "leaves the new script near chance"),  # below twice chance (0.333)
        (0.30, 0.34, "does not help the new script"),  # above twice chance, gain < 0.05
        (0.30, 0.36, "helps, but far from what a few labels give"),  # gain >= 0.05
    ],
)
def test_adaptation_verdict_follows_the_thresholds(before, after, verdict):
    line = _adaptation_line(_shift(after, white_before=before))
    assert verdict in line
    assert f"{after - before:+.3f}" in line  # the change it was chosen by is stated


def test_the_hindsight_best_detector_is_the_highest_auroc_and_never_the_advised_one():
    for best, aurocs in (("mahalanobis", (0.9, 0.88, 0.97)), ("energy", (0.9, 0.99, 0.5))):
        shift = _shift(
            0.13,
            auroc_max_softmax=aurocs[0],
            auroc_energy=aurocs[1],
            auroc_mahalanobis=aurocs[2],
            coverage_energy=0.4,
            selective_acc_energy=0.9,
        )
        text = "\n".join(task1_section(shift, None))
        assert f"best model-based detector is {best} on vgg (AUROC {max(aurocs):.3f})" in text
        advice = text.split("**Advice to the client.**")[1]
        assert "(max_softmax)" in advice and best not in advice  # advice: declared in advance


def test_task1_section_without_runs_says_how_to_fill_it(tmp_path):
    assert "No `task1-shift` runs yet" in "\n".join(task1_section({}, None))
    assert plot_label_efficiency(_shift(0.13), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert not plot_label_efficiency({}, tmp_path / "none.png")


def _cells(*accuracies: float) -> pd.DataFrame:
    return pd.DataFrame(
        [{"step": "task2-step3", "model": f"m{i}", "accuracy": a} for i, a in enumerate(accuracies)]
        + [{"step": "task2-step1", "model": "m0", "accuracy": 0.999}]  # TRAIN model: not Task 2's
    )


def _ensembles(*pairs: tuple[bool, float]) -> pd.DataFrame:
    member = Member("r1", "task2-step3", "m0", 0.99)
    return to_frame(
        [EnsembleResult("e", "TEST2", tta, [member], {"TEST2_acc": acc}) for tta, acc in pairs]
    )


@pytest.mark.parametrize(
    ("singles", "ensembles", "met"),
    [
        ((0.97, 0.95), (), False),
        ((0.991, 0.95), (), True),
        ((0.97,), ((False, 0.98),), False),
        ((0.97,), ((False, 0.98), (True, 0.991)), True),
    ],
)
def test_task2_verdict_follows_the_best_number(singles, ensembles, met):
    text = "\n".join(task2_section(_cells(*singles), _ensembles(*ensembles)))
    best = max([*singles, *(acc for _, acc in ensembles)])
    if met:
        assert "Some row reaches 0.99 in hindsight" in text
    else:
        assert f"No row reaches 0.99, even in hindsight: the best is {best:.4f}" in text
    assert "hindsight (picked by its TEST2 accuracy" in text
    assert f"{sum(a >= 0.99 for a in singles)} of {len(singles)} single-model cells" in text


def test_tta_gain_is_the_difference_of_the_pair():
    text = "\n".join(task2_section(_cells(0.97), _ensembles((False, 0.98), (True, 0.991))))
    assert "+0.0110 to +0.0110" in text


def test_shift_markdown_has_a_row_per_model_and_detector():
    text = shift_markdown({**_shift(0.13), "resnet": _shift(0.2)["vgg"]})
    assert text.count("| vgg ") >= 4 + 1 and text.count("| resnet ") >= 4 + 1
    assert "## Unsupervised adaptation" in text and "## Label efficiency" in text


def _condition_cells() -> pd.DataFrame:
    rows = []
    for step in ("task1-step1", "task1-step2", "task2-step1", "task2-step2", "task2-step3"):
        for model in ("vgg", "resnet"):
            task1 = step.startswith("task1")
            rows.append(
                {
                    "step": step,
                    "model": model,
                    "accuracy": 0.55 if task1 else 0.97,
                    "reference": 0.96,
                    "black_acc": 0.975 if task1 else float("nan"),
                    "searched_minus_baseline": 0.01,
                    "vs_baseline": "no detectable difference",
                }
            )
    cells = pd.DataFrame(rows)
    cells["delta"] = cells["accuracy"] - cells["reference"]
    return cells


def _condition(lines: list[str], start: str) -> list[str]:
    row = next(line for line in "\n".join(lines).splitlines() if line.startswith(f"| {start}"))
    return [part.strip() for part in row.split("|")[2:-1]]


def test_search_conditions_count_each_miss_and_what_is_not_measured():
    cells = _condition_cells()
    lines = search_conditions(cells, models=2)
    assert _condition(lines, "searched answer not") == ["8 of 8", "none"]
    assert _condition(lines, "TEST / TEST2") == ["4 of 4", "none"]
    assert _condition(lines, "TEST black half") == ["4 of 4", "none"]
    # task2-step1 trains nothing: a loss there is no miss of the search
    at = lambda step, model: (cells["step"] == step) & (cells["model"] == model)  # noqa: E731
    cells.loc[at("task2-step1", "vgg"), ["searched_minus_baseline", "vs_baseline"]] = [
        -0.05,
        "worse",
    ]
    # a loss the paired test finds significant is a miss; one within the noise is not
    cells.loc[at("task2-step2", "vgg"), ["searched_minus_baseline", "vs_baseline"]] = [
        -0.006,
        "worse",
    ]
    cells.loc[at("task2-step3", "resnet"), ["searched_minus_baseline", "vs_baseline"]] = [
        -0.02,
        "no detectable difference",
    ]
    cells.loc[at("task2-step3", "resnet"), ["accuracy", "delta"]] = [0.954, -0.006]  # a miss
    cells.loc[at("task1-step2", "vgg"), "black_acc"] = 0.969
    cells.loc[at("task1-step1", "resnet"), "black_acc"] = float("nan")  # not measured yet
    lines = search_conditions(cells, models=2)
    assert _condition(lines, "searched answer not") == ["7 of 8", "task2-step2/vgg -0.006"]
    assert _condition(lines, "TEST / TEST2") == ["3 of 4", "task2-step3/resnet -0.006"]
    assert _condition(lines, "TEST black half") == [
        "2 of 3 (1 not measured)",
        "task1-step2/vgg 0.969",
    ]
