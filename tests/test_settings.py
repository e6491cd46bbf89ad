"""One settings resolver for every run: its precedence, its checks, and train/search agreeing."""

from __future__ import annotations

import optuna
import pytest
from conftest import runs_in

from experiments.cli import main
from experiments.core.settings import TrainConfig, resolve
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.search.study import make_storage

TINY = dict(trials=2, epochs=1, train_subset=0, final_epochs=1, warmup_epochs=0)


def test_each_layer_beats_the_one_below():
    layers = ["base", "searched", "role", "fixed", "user"]
    values = {name: 1e-4 * (i + 1) for i, name in enumerate(layers)}
    assert resolve("vgg").lr == TrainConfig().lr  # defaults only
    for top in range(len(layers)):
        given = {name: {"lr": values[name]} for name in layers[: top + 1]}
        if layers[top] == "user":  # a user value may not contradict a fixed one (tested below)
            given.pop("fixed")
        assert resolve("vgg", **given).lr == values[layers[top]], layers[top]


def test_model_knobs_and_training_settings_share_the_layers():
    cfg = resolve("resnet", base={"blocks": 2}, searched={"width": 8}, user={"blocks": "1"})
    assert cfg.model_kwargs == {"width": 8, "blocks": 1, "dropout": 0.2}
    assert cfg.flat()["blocks"] == 1


def test_user_contradicting_a_fixed_setting_is_one_error_naming_both():
    with pytest.raises(
        ValueError, match="--set polarity=keep contradicts step s's fixed setting polarity=to_black"
    ):
        resolve("vgg", fixed={"polarity": "to_black"}, user={"polarity": "keep"}, step="s")
    same = resolve("vgg", fixed={"polarity": "to_black"}, user={"polarity": "to_black"})
    assert same.polarity == "to_black"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "-1", "lr=-1.0: expected a finite number in \\(0.0, inf\\]"),
        ("lr", "inf", "lr=inf: expected a finite number"),
        ("lr", "nan", "lr=nan: expected a finite number"),
        ("label_smoothing", "5", "label_smoothing=5.0: expected a finite number in \\[0.0, 1.0\\)"),
        ("epochs", "0", "epochs=0: expected an integer >= 1"),
        ("epochs", "many", "epochs='many': expected a int"),
        ("optimizer", "lbfgs", "optimizer='lbfgs': expected one of: adam, adamw, sgd"),
        ("normalization", "zscore", "normalization='zscore': expected one of"),
        ("colour", "red", "unknown setting 'colour'"),
    ],
)
def test_bad_values_are_refused_by_the_resolver(key, value, message):
    with pytest.raises(ValueError, match=message):
        resolve("vgg", user={key: value})


def test_device_that_does_not_exist_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device=cuda: CUDA is not available"):
        resolve("vgg", user={"device": "cuda"})


def test_train_and_search_give_set_the_same_meaning(study_data, capsys):
    # train: a --set that contradicts the step is an error, before any run exists
    code = main(["train", "--step", "task2-mixed", "--model", "vgg", "--set", "polarity=keep"])
    assert code == 2 and "contradicts step task2-mixed's fixed setting" in capsys.readouterr().err
    code = main(["search", "--step", "task2-mixed", "--model", "vgg", "--set", "polarity=keep"])
    assert code == 2 and "contradicts step task2-mixed's fixed setting" in capsys.readouterr().err
    assert runs_in("task2-mixed") == []
    # search: a --set setting is kept by every run and is no longer searched
    budget = Budget(**TINY, overrides={"lr": "0.004", "width": "8"})
    run_step("task2-step3", "vgg", budget)
    study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
    assert all("lr" not in t.params and "width" not in t.params for t in study.trials)
    trained = runs_in("task2-step3", "tags.role != 'study'")
    final = next(r for r in trained if r.data.tags["role"] == "final")
    trial0_won = final.data.tags.get("also_baseline") == "true"  # then the final is the baseline
    assert len(trained) == (3 if trial0_won else 4)  # two trials, the final (and the baseline)
    assert {(r.data.params["lr"], r.data.params["width"]) for r in trained} == {("0.004", "8")}
    # train: the same --set, the same value
    assert (
        main(
            [
                "train",
                "--step",
                "task2-step3",
                "--model",
                "vgg",
                "--epochs",
                "1",
                "--set",
                "lr=0.004",
            ]
        )
        == 0
    )
    run = runs_in("task2-step3", "tags.mlflow.runName = 'train-vgg'")[0]
    assert run.data.params["lr"] == "0.004"


@pytest.mark.parametrize(
    "setting", ["width=0", "dropout=1.5", "val_subset=5", f"seed={2**64}", "val_fraction=0.999"]
)
def test_every_setting_is_checked_before_any_run_exists(study_data, setting, capsys):
    from conftest import runs_in

    from experiments.cli import main

    for command in (["train", "--epochs", "1"], ["search", "--trials", "1"]):
        code = main([*command, "--step", "task2-step3", "--model", "vgg", "--set", setting])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and len(err) == 1
        assert setting.split("=")[0] in err[-1]
    assert runs_in("task2-step3") == []  # no run, FAILED or otherwise


def test_workers_must_be_at_least_one(study_data, capsys):
    from experiments.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["search", "--step", "task2-step3", "--model", "vgg", "--workers", "0"])
    assert exited.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_a_set_key_given_twice_with_two_values_is_refused():
    from experiments.core.settings import parse_overrides

    assert parse_overrides(["lr=0.1", "lr=0.1"]) == {"lr": "0.1"}  # the same value twice: fine
    with pytest.raises(ValueError, match=r"--set lr given twice \(0.1 and 0.5\)"):
        parse_overrides(["lr=0.1", "lr=0.5"])


def test_a_size_knob_below_one_is_one_line_naming_the_knob(study_data):
    """As a user types it: no torch warning, no torch-internal message, the knob and its bound."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "experiments", "train", "--step", "task2-step3"]
    done = subprocess.run(
        [*command, "--model", "vgg", "--set", "width=0"], capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == ["error: width=0: model vgg's width must be >= 1"]
