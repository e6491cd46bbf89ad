"""Task 1 shift tools: detectors on a constructed case, and the command on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.analysis.shift import Mahalanobis, run_shift
from experiments.core.statistics import accuracy_interval
from experiments.reporting.report import write_shift_report
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.tracking import store


def test_mahalanobis_scores_far_points_higher():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    labels = torch.arange(2).repeat_interleave(200)
    features = centres[labels] + torch.randn(400, 2, generator=generator)
    maha = Mahalanobis.fit(features, labels)
    near = maha.score(torch.tensor([[0.1, 0.0], [9.8, 0.2]]))
    far = maha.score(torch.tensor([[5.0, 8.0], [-6.0, -6.0]]))
    assert far.min() > near.max()


def test_shift_command_on_tiny_data(study_data, tmp_path, monkeypatch):
    import experiments.analysis.shift as shift
    from data_tools import load_split

    clusterings = []

    class RecordedKMeans(shift.KMeans):  # the real k-means, its clusters kept for the check
        def fit_predict(self, X, y=None, sample_weight=None):
            clusterings.append(super().fit_predict(X, y, sample_weight))
            return clusterings[-1]

    monkeypatch.setattr(shift, "KMeans", RecordedKMeans)
    monkeypatch.setattr(shift, "K_SHOTS", (1, 5))  # the two the checks below read
    monkeypatch.setattr(shift, "SHOT_COPIES", 60)  # tiny data: a tiny fine-tune
    run_step("task1-step1", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1))
    results = run_shift(("vgg",))
    metrics = results["vgg"].metrics
    # TEST is half each script (60 + 60 images): overall accuracy is the mean of the halves
    assert metrics["TEST_acc"] == pytest.approx(
        (metrics["TEST_black_acc"] + metrics["TEST_white_acc"]) / 2
    )
    assert metrics["auroc_background"] == 1.0  # the synthetic new script is drawn on white
    assert metrics["coverage_background"] == 0.5  # refuses exactly the white half
    assert metrics["new_script_accepted_background"] == 0.0
    for name in ("max_softmax", "energy", "mahalanobis"):
        assert (metrics[f"coverage_{name}"] * 120) == pytest.approx(
            round(metrics[f"coverage_{name}"] * 120)
        )
    for k in (1, 5):  # the rest of TEST after k white images per class: 60 black, 60 - 6k white
        rest_black, rest_white = 60, 60 - 6 * k
        mean = (
            rest_black * metrics[f"k{k}_black_rest_acc"]
            + rest_white * metrics[f"k{k}_white_rest_acc"]
        )
        assert metrics[f"k{k}_TEST_rest_acc"] == pytest.approx(mean / (rest_black + rest_white))
    assert metrics["selftrain_round0_pseudo_labelled"] % 6 == 0  # class-balanced
    # every rate carries its 95 % Wilson interval over the images it counts, the AUROCs a
    # bootstrap interval over TEST's images
    for key, n in (("TEST_acc", 120), ("TEST_white_acc", 60), ("coverage_energy", 120)):
        expected = accuracy_interval(round(metrics[key] * n), n)
        got = (metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"])
        assert got == pytest.approx((expected.low, expected.high))
    assert metrics["new_script_accepted_energy_n"] == 60
    for name in ("max_softmax", "energy", "mahalanobis"):
        low, high = metrics[f"auroc_{name}_ci_low"], metrics[f"auroc_{name}_ci_high"]
        assert 0 <= low <= metrics[f"auroc_{name}"] <= high <= 1
    assert metrics["k1_white_rest_acc_n"] == 54 and "k1_white_rest_acc_ci_low" in metrics
    # purity: of the clusters k-means drew, against the labels of the images the background
    # rule calls new (TEST's white half here), not of any other images
    test = load_split("TEST", study_data, tmp_path / "cache")
    truth = test.labels[shift.is_new_by_background(test.images)].numpy()
    (clusters,) = clusterings
    assert len(clusters) == len(truth) == 60
    assert metrics["kmeans_new_purity"] == pytest.approx(shift.cluster_purity(truth, clusters))
    write_shift_report(tmp_path / "reports")
    text = (tmp_path / "reports" / "task1_shift.md").read_text()
    assert "| vgg     | background" in text and "Unsupervised adaptation" in text
    low, high = metrics["TEST_acc_ci_low"], metrics["TEST_acc_ci_high"]
    assert f"{metrics['TEST_acc']:.3f} [{low:.3f}, {high:.3f}]" in text  # shown with its interval
    run_step("task1-step1", "hybrid", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1))
    run_shift(("hybrid",), curve=False, adapt=False)
    write_shift_report(tmp_path / "reports")
    text = (tmp_path / "reports" / "task1_shift.md").read_text()
    assert "| vgg     | background" in text and "| hybrid  | background" in text  # both kept
    store.init()
    runs = MlflowClient().search_runs([store.experiment_id("task1-shift")])
    assert runs and runs[0].data.tags["label_use"].startswith("TRAIN labels")
    assert np.isclose(runs[0].data.metrics["auroc_background"], 1.0)


def test_k_shot_sampler_never_evaluates_on_its_training_images(study_data):
    from data_tools import load_split
    from experiments.analysis.shift import sample_k_shot

    test = load_split("TEST", study_data)
    for k in (1, 5):
        shots, rest = sample_k_shot(test, k, seed=0)
        assert len(shots) == 6 * k and bool(test.white[shots].all())
        assert torch.bincount(test.labels[shots], minlength=6).tolist() == [k] * 6
        assert set(shots.tolist()).isdisjoint(rest.tolist())
        assert len(shots) + len(rest) == len(test)
    again, _ = sample_k_shot(test, 5, seed=0)
    assert torch.equal(again, sample_k_shot(test, 5, seed=0)[0])


def test_self_training_uses_only_confident_class_balanced_pseudo_labels(study_data):
    from data_tools import load_split
    from experiments.analysis.shift import self_train
    from experiments.training.checkpoint import load_checkpoint

    run = run_step("task1-step1", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1))
    loaded = load_checkpoint(run.final_run_id)
    train, test = load_split("TRAIN", study_data), load_split("TEST", study_data)
    _, log = self_train(loaded, train, test.images, rounds=1, confidence=1.01)
    assert log[0]["pseudo_labelled"] == 0  # nothing is that confident: nothing is trained on
    _, log = self_train(loaded, train, test.images, rounds=1, confidence=0.0)
    counts = torch.bincount(log[0]["labels"], minlength=6)
    assert len(set(counts[counts > 0].tolist())) == 1  # the same number per predicted class


def test_kmeans_purity_is_one_for_separable_clusters():
    import numpy as np

    from experiments.analysis.shift import cluster_purity

    truth = np.repeat(np.arange(6), 10)
    assert cluster_purity(truth, (truth + 3) % 6) == 1.0  # names do not matter, only the grouping
    assert cluster_purity(truth, np.zeros(60, dtype=int)) == 10 / 60
