"""The report's generated prose follows the numbers it is given."""

from __future__ import annotations

from experiments.ensemble import EnsembleResult, Member
from experiments.findings import plot_label_efficiency, task1_section, task2_section
from experiments.report import Cell


def _shift(white_after: float) -> dict[str, dict[str, float]]:
    values = {
        "TEST_acc": 0.55,
        "TEST_black_acc": 0.96,
        "TEST_white_acc": 0.12,
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
        "kmeans_new_purity": 0.4,
    }
    for k, acc in zip((1, 5, 20, 100), (0.3, 0.5, 0.7, 0.85), strict=True):
        values[f"k{k}_TEST_rest_acc"] = 0.5 + acc / 2
        values[f"k{k}_white_rest_acc"] = acc
        values[f"k{k}_black_rest_acc"] = 0.95
    return {"vgg": values}


def test_task1_section_states_the_numbers_and_chooses_its_words(tmp_path):
    text = "\n".join(task1_section(_shift(0.13), "figures/x.png"))
    assert "mahalanobis on vgg (AUROC 0.970)" in text
    assert "declared in advance, max_softmax" in text and "answer 0.600 of TEST" in text
    assert "are right on 0.800 of what they answer" in text
    assert "mahalanobis on vgg, answers 50.0% at 0.950" in text and "optimistic" in text
    assert "(max_softmax) it answers 0.600 of these images at 0.800 accuracy" in text
    assert "leaves the new script near chance" in text
    assert "0.700 with k = 20 (120 images)" in text and "![label efficiency]" in text
    better = "\n".join(task1_section(_shift(0.4), None))
    assert "helps, but far from what a few labels give" in better
    assert "1 labelled image per class gives 0.300" in better
    assert "No `task1-shift` runs yet" in "\n".join(task1_section({}, None))
    assert plot_label_efficiency(_shift(0.13), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_task2_section_says_whether_the_target_is_met():
    rows = [[Cell("task2-step3", "vgg", accuracy=0.97), Cell("task2-step3", "resnet", 0.95)]]
    member = Member("r1", "task2-step3", "vgg", 0.99)
    low = EnsembleResult("e", "TEST2", False, [member], {"TEST2_acc": 0.98})
    high = EnsembleResult("e", "TEST2", True, [member], {"TEST2_acc": 0.991})
    assert "**not** met: the best is 0.9800" in "\n".join(task2_section(rows, [low]))
    text = "\n".join(task2_section(rows, [low, high]))
    assert "The target 0.99 is met." in text and "+0.0110 to +0.0110" in text
