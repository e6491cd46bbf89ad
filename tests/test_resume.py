"""Long runs continue at their next epoch after an interruption (experiments/training/resume.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import runs_in
from mlflow.tracking import MlflowClient

from experiments.core.settings import TrainConfig
from experiments.core.steps import get_step
from experiments.training.runner import load_step_data, resume_path, train_and_log
from experiments.training.train import fit

CFG = {"epochs": 3, "batch_size": 32, "lr": 3e-3, "patience": 5, "augmentation": "affine"}


class Interrupted(Exception):
    """Stands in for a killed process: raised by a sink after an epoch."""


def _stop_at(epoch: int):
    def sink(row):
        if row["epoch"] == epoch:
            raise Interrupted

    return sink


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


def test_an_interrupted_run_continues_where_it_stopped_and_ends_as_if_never_stopped(
    study_data, tmp_path, capsys
):
    data = load_step_data(get_step("task2-step3"))
    cfg = TrainConfig(model="efficientnet", ema_decay=0.9, **CFG)
    whole = fit(cfg, data.train_set)
    path = tmp_path / "state.pt"
    with pytest.raises(Interrupted):
        fit(cfg, data.train_set, on_epoch=[_stop_at(1)], resume=path)
    assert path.exists()  # the state after epoch 0 (epoch 1 was interrupted)
    seen = []
    resumed = fit(
        cfg, data.train_set, on_epoch=[lambda row: seen.append(row["epoch"])], resume=path
    )
    assert "resuming at epoch 1" in capsys.readouterr().err
    assert seen == [0, 1, 2]  # the restored row reaches the sinks again: a whole curve
    assert resumed.split["resumed_at_epoch"] == 1 and "resumed_at_epoch" not in whole.split
    assert _strip(resumed.history) == _strip(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    for a, b in zip(
        whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_damaged_state_starts_over_and_one_that_does_not_fit_stops_in_one_line(
    study_data, tmp_path, capsys
):
    data = load_step_data(get_step("task2-step3"))
    path = tmp_path / "state.pt"
    path.write_bytes(b"\x00 not a state")
    cfg = TrainConfig(model="efficientnet", **{**CFG, "epochs": 2})
    result = fit(cfg, data.train_set, resume=path)
    assert "cannot resume from it" in capsys.readouterr().err
    assert "resumed_at_epoch" not in result.split and len(result.history) == 2
    with pytest.raises(Interrupted):
        fit(cfg, data.train_set, on_epoch=[_stop_at(1)], resume=path)
    other = TrainConfig(model="vgg", **{**CFG, "epochs": 2})  # another model, same file
    with pytest.raises(
        RuntimeError, match="does not fit the run .*delete it to start the run over"
    ):
        fit(other, data.train_set, resume=path)


def test_a_tracked_run_resumes_under_its_settings_and_data_and_cleans_up(study_data):
    data = load_step_data(get_step("task2-step3"))
    cfg = TrainConfig(model="efficientnet", **CFG)
    path = resume_path(data, cfg)
    assert resume_path(data, TrainConfig(model="efficientnet", **{**CFG, "seed": 1})) != path
    with pytest.raises(Interrupted):
        train_and_log(data, cfg, "final", on_epoch=[_stop_at(2)], resumable=True)
    assert path.exists()
    outcome = train_and_log(data, cfg, "final", resumable=True)
    assert not path.exists()  # the run is complete: its state is gone
    (run,) = [r for r in runs_in("task2-step3") if r.info.run_id == outcome.run_id]
    assert run.data.params["split.resumed_at_epoch"] == "2"
    # the whole curve is in the new run: the restored epochs were logged again
    curve = MlflowClient().get_metric_history(outcome.run_id, "val_acc")
    assert sorted(m.step for m in curve) == [0, 1, 2]
    train_and_log(data, cfg, "trial", on_epoch=[])  # not resumable: writes no state
    assert not path.exists()


def test_a_restored_optimizer_keeps_the_learning_rate_tensor_a_graph_reads(tmp_path):
    """Under a CUDA graph the optimizer's learning rate is a device tensor the schedule fills
    in place; `load_state_dict` swaps in a copy, which the restore must not leave there."""
    from torch import nn

    from experiments.training.resume import restore, save
    from experiments.training.train import (
        BestEpoch,
        Stepper,
        WeightAverage,
        make_optimizer,
        make_scheduler,
    )

    cfg = TrainConfig(model="vgg", optimizer="sgd", schedule="cosine", lr=0.01)

    def stepper():
        model = nn.Linear(4, 2)
        optimizer = make_optimizer(cfg, model.parameters(), captured=True)
        step = Stepper(model, optimizer, nn.CrossEntropyLoss(), 4, torch.Generator())
        step.scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=5)
        return step, WeightAverage(cfg, model, optimizer, "probe"), BestEpoch()

    step, average, best = stepper()
    for _ in range(3):
        step.optimizer.step()
        step.scheduler.step()
    best.state = step.model.state_dict()
    saved_lr = float(step.optimizer.param_groups[0]["lr"])
    save(tmp_path / "state.pt", 0, step, average, best, [])
    step, average, best = stepper()
    live = step.optimizer.param_groups[0]["lr"]
    assert restore(tmp_path / "state.pt", step, average, best, "probe")[0] == 1
    assert step.optimizer.param_groups[0]["lr"] is live and float(live) == saved_lr
    step.scheduler.step()
    assert step.optimizer.param_groups[0]["lr"] is live and float(live) < saved_lr
