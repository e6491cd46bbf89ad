"""Operating points: each profile is one named budget, ordered by what it spends."""

from __future__ import annotations

import shutil

import pytest
from test_architecture import _make, _project_copy

from experiments.search.space import PROFILES, default_budget

TRAIN_SPLIT = 28_800  # TRAIN's training images after the 20 % validation split


def _images(profile: str) -> tuple[int, int]:
    """(trial images, final images) of one task1-step1 study at this profile."""
    budget = default_budget(profile)
    seen = min(budget.train_subset or TRAIN_SPLIT, TRAIN_SPLIT)
    trials = budget.trials * budget.trial_epochs(TRAIN_SPLIT) * seen
    return trials, budget.retrain_epochs(TRAIN_SPLIT) * TRAIN_SPLIT


def test_the_profiles_are_ordered_by_the_images_they_train():
    assert {"quick", "cpu", "full", "gpu"} <= set(PROFILES)
    order = [_images(name) for name in ("quick", "cpu", "full")]
    assert order == sorted(order) and len(set(order)) == 3
    # the TEST black half needs about 10 epochs of TRAIN: full's finals train that many
    assert default_budget("full").retrain_epochs(TRAIN_SPLIT) >= 10
    assert default_budget("quick").retrain_epochs(TRAIN_SPLIT) == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_reproduce_full_seeds_every_trained_answer_and_cpu_does_not(tmp_path):
    project = _project_copy(tmp_path)
    full = _make(project, "-n", "reproduce", "PROFILE=full", "JOBS=1")
    assert full.returncode == 0, full.stderr
    for step in ("task1-step1", "task1-step2", "task2-step3", "task2-step2"):
        assert f"seeds --step {step} --model vgg --seeds 2" in full.stdout
    assert "--step task2-step1 --model vgg --seeds" not in full.stdout
    assert "--profile full" in full.stdout
    cpu = _make(project, "-n", "reproduce", "JOBS=1")
    assert cpu.returncode == 0 and " seeds --step" not in cpu.stdout
