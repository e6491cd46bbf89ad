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
    # the TEST black half needs about 10 epochs of TRAIN: full's finals train that many,
    # and EfficientNet's (an epoch a third of VGG's on a CPU) three times as many
    full = default_budget("full")
    assert full.retrain_epochs(TRAIN_SPLIT) >= 10
    assert full.retrain_epochs(TRAIN_SPLIT, "efficientnet") == 3 * full.retrain_epochs(TRAIN_SPLIT)
    assert full.retrain_epochs(TRAIN_SPLIT, "vgg") == full.retrain_epochs(TRAIN_SPLIT)
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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize(
    ("plan", "plan_exit", "expected"),
    [
        (
            "task2-step3.vgg.2 task1-step1.resnet.1",
            0,
            ["task2-step3 vgg 2", "task1-step1 resnet 1"],
        ),
        ("", 0, []),  # every seed trained: nothing runs, and make succeeds
        ("", 1, None),  # the plan fails (a study without an answer): make fails, nothing runs
    ],
)
def test_full_seeds_trains_exactly_the_planned_goals(tmp_path, plan, plan_exit, expected):
    """`make full-seeds` asks `seeds --plan` for the missing seeds and trains each goal once
    with `--only K`; the interpreter here is a stand-in that logs what it was asked."""
    project = _project_copy(tmp_path)
    log = tmp_path / "calls.log"
    python = project / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--plan*) '
        f'for g in {plan}; do echo "$g"; done; '
        f'[ {plan_exit} -eq 0 ] || echo "error: no answer" >&2; exit {plan_exit};; esac\n'
        f'echo "$OMP_NUM_THREADS $*" >> {log}\n'
    )
    python.chmod(0o755)
    made = _make(project, "full-seeds", "JOBS=2", "MODELS=vgg resnet")
    if expected is None:
        assert made.returncode != 0 and not log.exists()
        return
    assert made.returncode == 0, made.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    asked = sorted(" ".join(c.split()[i] for i in (5, 7, 11)) for c in calls)  # step, model, k
    assert asked == sorted(expected)
    assert all("--seeds 2 --only" in call for call in calls)
    assert f"{len(expected)} seed runs to train" in made.stdout
