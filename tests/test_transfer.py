"""Transfer steps: pretraining is found or made once, fine-tunes start from it and say so."""

from __future__ import annotations

import pytest
import torch
from conftest import runs_in

from data_tools import load_split
from experiments.core.settings import TrainConfig
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.training.checkpoint import load_checkpoint
from experiments.training.train import fit

SMALL = {"width": 8, "depth": 1, "hidden": 64}
TINY = dict(trials=2, epochs=2, train_subset=0, final_epochs=2, warmup_epochs=0)


def test_transfer_study_pretrains_once_and_fine_tunes_from_it(study_data):
    run_step("task2-transfer", "vgg", Budget(**TINY))
    pretrain = runs_in("task2-pretrain")
    assert len(pretrain) == 1  # no task1-step1 study yet: one pretraining run on TRAIN, defaults
    source = pretrain[0]
    assert source.data.tags["role"] == "pretrain" and source.data.tags["train_set"] == "TRAIN"
    assert source.data.tags["settings_from"] == "defaults"
    runs = runs_in("task2-transfer")
    children = [r for r in runs if r.data.tags.get("role") in ("trial", "final")]
    assert len(children) == 3
    for run in children:
        assert run.data.tags["pretrained_run"] == source.info.run_id
        assert run.data.params["init_from"] == source.info.run_id
        assert run.data.params["freeze"] in ("none", "early", "body")
        assert run.data.tags["label_use"].startswith("TRAIN labels (pretraining) and TEST labels")
        assert run.data.tags["train_set"] == "TEST"
        # the final is scored on TEST2; trials are not (no --score-trials)
        assert ("TEST2_acc" in run.data.metrics) == (run.data.tags["role"] == "final")
        assert run.data.params["normalization"] == source.data.params["normalization"]
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    assert parent.data.tags["pretrained_run"] == source.info.run_id
    run_step("task2-transfer", "vgg", Budget(**TINY))  # resumed: nothing pretrained again
    assert len(runs_in("task2-pretrain")) == 1


def test_transfer_reuses_the_task1_final_run_or_pretrains_the_fixed_polarity(study_data):
    step1 = run_step("task1-step1", "vgg", Budget(**{**TINY, "trials": 1}))
    source_polarity = runs_in("task1-step1", f"attributes.run_id = '{step1.final_run_id}'")[
        0
    ].data.params["polarity"]
    run_step("task2-transfer", "vgg", Budget(**{**TINY, "trials": 1}))
    finals = runs_in("task2-transfer", "tags.role = 'final'")
    assert finals[0].data.tags["pretrained_run"] == step1.final_run_id  # no polarity fixed: reused
    run_step("task2-transfer-white", "vgg", Budget(**{**TINY, "trials": 1}))
    white = runs_in("task2-transfer-white", "tags.role = 'final'")[0]
    assert white.data.params["polarity"] == "to_black"
    pretrain = runs_in("task2-pretrain")
    if source_polarity == "to_black":
        assert white.data.tags["pretrained_run"] == step1.final_run_id and not pretrain
    else:
        assert [r.info.run_id for r in pretrain] == [white.data.tags["pretrained_run"]]
        assert pretrain[0].data.params["polarity"] == "to_black"
        assert pretrain[0].data.tags["settings_from"] == step1.final_run_id


def _pretrained_file(study_data, tmp_path, **settings) -> str:
    from experiments.training.checkpoint import make_checkpoint

    train = load_split("TRAIN", study_data)
    cfg = TrainConfig(model="vgg", epochs=1, model_kwargs=SMALL, **settings)
    result = fit(cfg, train)
    path = tmp_path / "pretrained.pt"
    checkpoint = make_checkpoint(
        "vgg", cfg.model_kwargs, result.model, result.preprocessing, cfg.flat(), 0, {}, "t"
    )
    torch.save(checkpoint, path)
    return str(path)


def test_freeze_body_trains_only_the_head(study_data, tmp_path):
    path = _pretrained_file(study_data, tmp_path)
    before = load_checkpoint(path).model.state_dict()
    cfg = TrainConfig(model="vgg", epochs=2, model_kwargs=SMALL, init_from=path, freeze="body")
    result = fit(cfg, load_split("TEST", study_data))
    after = result.model.state_dict()
    for name, tensor in after.items():
        if name.endswith("weight") or name.endswith("bias"):
            changed = not torch.equal(tensor.cpu(), before[name])
            assert changed == name.startswith("head."), name


def test_a_fine_tune_keeps_the_normalization_statistics_its_weights_were_trained_with(
    study_data, tmp_path
):
    path = _pretrained_file(study_data, tmp_path, normalization="dataset")
    pretrained = load_checkpoint(path).preprocessing
    test = load_split("TEST", study_data)  # half white: other statistics than TRAIN's
    settings = {"model": "vgg", "epochs": 1, "model_kwargs": SMALL, "normalization": "dataset"}
    tuned = fit(TrainConfig(**settings, init_from=path), test).preprocessing
    assert (tuned.mean, tuned.std) == (pretrained.mean, pretrained.std)
    fresh = fit(TrainConfig(**settings), test).preprocessing  # from scratch: fitted on TEST
    assert abs(fresh.mean - pretrained.mean) > 0.1
    # another polarity than the pretrained run's: its statistics do not apply, they are refitted
    other = fit(TrainConfig(**settings, init_from=path, polarity="to_black"), test).preprocessing
    assert (other.mean, other.std) != (pretrained.mean, pretrained.std)


def test_init_from_a_checkpoint_of_another_shape_is_a_clear_error(study_data, tmp_path):
    path = _pretrained_file(study_data, tmp_path)
    cfg = TrainConfig(model="vgg", epochs=1, model_kwargs={**SMALL, "width": 16}, init_from=path)
    with pytest.raises(ValueError, match="weights do not fit vgg"):
        fit(cfg, load_split("TEST", study_data))
    with pytest.raises(ValueError, match="needs init_from"):
        TrainConfig(model="vgg", freeze="body")


def test_train_command_fine_tunes_a_transfer_step(study_data, capsys):
    from experiments.cli import main

    code = main(["train", "--step", "task2-transfer-white", "--model", "vgg", "--epochs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fine-tuning the pretrained run" in out and "TEST2_acc" in out
    pretrain = runs_in("task2-pretrain")
    assert len(pretrain) == 1 and pretrain[0].data.params["polarity"] == "to_black"
    run = runs_in("task2-transfer-white")[0]
    assert run.data.params["init_from"] == pretrain[0].info.run_id
    assert run.data.params["polarity"] == "to_black" and run.data.params["epochs"] == "1"


def test_long_step_retrains_the_source_studys_best_trial_once(study_data):
    from experiments.core.steps import STEPS

    with pytest.raises(RuntimeError, match="make task2-step3"):
        run_step("task2-step3-long", "vgg", Budget(**TINY))
    source = run_step("task2-step3", "vgg", Budget(**TINY))
    long = run_step("task2-step3-long", "vgg", Budget(**TINY))
    runs = runs_in("task2-step3-long")
    assert len(runs) == 1 and runs[0].info.run_id == long.final_run_id
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["role"] == "final" and tags["params_from"] == "task2-step3/vgg"
    assert tags["retrain_of_trial"] == str(source.best_trial)
    assert params["epochs"] == str(STEPS["task2-step3-long"].role_settings["epochs"])
    for key, value in source.best_params.items():
        assert params[key] == str(value)
    again = run_step("task2-step3-long", "vgg", Budget(**TINY))  # found, not retrained
    assert again.final_run_id == long.final_run_id and len(runs_in("task2-step3-long")) == 1
