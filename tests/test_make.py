"""The make command surface: one way to name models, booleans that mean what they say,
defaults that agree with the CLI, help by workflow."""

from __future__ import annotations

import shutil

import pytest
from test_architecture import _make, _project_copy

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _project_copy(tmp_path_factory.mktemp("make"))


@pytest.mark.parametrize("variable", ["MODELS", "MODEL"])
def test_models_are_named_one_way_for_steps_and_train(project, variable):
    step = _make(project, "-n", "task2-step3", f"{variable}=resnet")
    assert (
        step.returncode == 0
        and "--model resnet" in step.stdout
        and "--model vgg" not in step.stdout
    )
    train = _make(project, "-n", "train", "STEP=task2-step3", f"{variable}=resnet")
    assert train.returncode == 0 and "train --step task2-step3 --model resnet" in train.stdout
    assert _make(project, "-n", "search").returncode != 0  # a study is started by its step only


def test_train_refuses_no_model_or_several(project):
    for extra in ([], ["MODELS=vgg resnet"]):
        done = _make(project, "-n", "train", *extra)
        assert done.returncode != 0 and "name exactly one model" in done.stderr


@pytest.mark.parametrize(
    ("value", "flag"), [("0", False), ("no", False), ("1", True), ("yes", True)]
)
def test_tta_means_what_it_says(project, value, flag):
    done = _make(project, "-n", "report", f"TTA={value}")
    assert done.returncode == 0 and ("--tta" in done.stdout) == flag


def test_a_boolean_that_is_neither_is_an_error(project):
    done = _make(project, "-n", "report", "TTA=maybe")
    assert done.returncode != 0 and "TTA=maybe: expected 1 or 0" in done.stderr


def test_report_defaults_agree_between_make_and_the_cli(project):
    from experiments.cli import build_parser

    done = _make(project, "-n", "report")
    assert done.returncode == 0 and "--ensemble" not in done.stdout  # the CLI's default
    assert build_parser().parse_args(["report"]).ensemble == 3
    assert "--ensemble 5" in _make(project, "-n", "report", "ENSEMBLE=5").stdout


def test_clean_cache_honours_cache_dir(project, tmp_path):
    done = _make(project, "-n", "clean-cache", f"CACHE_DIR={tmp_path}/elsewhere")
    assert f"rm -rf {tmp_path}/elsewhere" in done.stdout


def test_help_starts_with_reproduce_groups_by_workflow_and_lists_variables(project):
    text = _make(project, "help").stdout
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    groups = [line for line in lines if not line.startswith(("help", "make")) and "  " not in line]
    assert groups[:5] == ["Start", groups[1], "Results and models", "Inspect", "Develop"]
    first = lines[lines.index("Start") + 1]
    assert first.startswith("reproduce ")
    assert "%" not in text  # no pattern rule shown literally
    variables = text.partition("Variables")[2]
    assert all(name in variables for name in ("MODELS=", "TTA=", "JOBS=", "PROFILE=", "IN="))
