"""The static training step (experiments/training/graphs.py): everything but the CUDA capture
itself, which needs a GPU (`make gpu-bench` compares it with eager steps there)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data_tools import Dataset
from experiments.core.settings import TrainConfig
from experiments.training.graphs import (
    ENV,
    StaticStep,
    capturable_optimizer_args,
    graph_blocker,
    graphs_requested,
)
from experiments.training.train import Stepper, fit, make_optimizer, make_scheduler, train_one_epoch
from models import create_model

CUDA = torch.device("cuda")  # graph_blocker reads only the device's type


def _stepper(cfg: TrainConfig, images: torch.Tensor, static: bool) -> Stepper:
    torch.manual_seed(0)
    model = create_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    prep = cfg.preprocessing().fit(images)
    augment = prep.augmenter()
    step = Stepper(
        model,
        optimizer,
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        cfg.batch_size,
        torch.Generator().manual_seed(1),
        scheduler=make_scheduler(cfg, optimizer, len(images) // cfg.batch_size),
        augment=augment,
    )
    step.averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    step.static = StaticStep(step, capture=False) if static else None
    return step


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(
        0, 6, (n,), generator=generator
    )


def test_static_steps_train_exactly_like_eager_steps_on_whole_batches():
    """Same seed, same batches, augmentation, a schedule and a weight average: the static step
    (buffers filled by index, the path a CUDA graph replays) gives the eager loop's losses,
    accuracies and weights bit for bit."""
    cfg = TrainConfig(
        model="efficientnet", batch_size=16, schedule="cosine", augmentation="affine", epochs=2
    )
    images, labels = _data(64)
    eager, static = _stepper(cfg, images, False), _stepper(cfg, images, True)
    for epoch in range(2):
        torch.manual_seed(10 + epoch)  # the augmentation's draws
        eager_row = train_one_epoch(eager, images, labels)
        torch.manual_seed(10 + epoch)
        assert train_one_epoch(static, images, labels) == eager_row
    assert static.static.steps == 8
    for a, b in zip(
        eager.model.state_dict().values(), static.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for a, b in zip(eager.averaged.parameters(), static.averaged.parameters(), strict=True):
        assert torch.equal(a, b)
    assert eager.optimizer.param_groups[0]["lr"] == static.optimizer.param_groups[0]["lr"]


def test_static_steps_drop_the_last_partial_batch_and_count_only_what_trained():
    cfg = TrainConfig(model="vgg", batch_size=16)
    images, labels = _data(40)  # two whole batches and 8 images left over
    step = _stepper(cfg, images, True)
    progress = SimpleNamespace(n=0, update=lambda k: setattr(progress, "n", progress.n + k))
    _, accuracy = train_one_epoch(step, images, labels, progress)
    assert progress.n == 32 and step.static.steps == 2
    assert accuracy * 32 == pytest.approx(round(accuracy * 32))  # a count out of 32, not 40
    with pytest.raises(ValueError, match="batches of 16, not 8"):
        step.static(images, labels, torch.arange(8))


def test_graph_blocker_names_what_cannot_be_captured():
    base = TrainConfig(model="vgg", batch_size=128)
    assert graph_blocker(base, CUDA, 128) is None
    assert "CUDA device" in graph_blocker(base, torch.device("cpu"), 128)
    assert graph_blocker(base, CUDA, 127) == "127 training images make no whole batch of 128"
    for settings, reason in (
        ({"mixup_alpha": 0.2}, "MixUp"),
        ({"cutmix_alpha": 1.0}, "MixUp"),
        ({"schedule": "onecycle"}, "onecycle"),
        ({"swa_start": 0.5, "epochs": 4}, "SWA"),
    ):
        assert reason in graph_blocker(TrainConfig(model="vgg", **settings), CUDA, 10_000)


@pytest.mark.parametrize(
    ("value", "wanted"), [("", False), ("0", False), ("1", True), ("yes", True)]
)
def test_the_switch_reads_one_or_zero(monkeypatch, value, wanted):
    monkeypatch.setenv(ENV, value)
    assert graphs_requested() is wanted


def test_a_bad_switch_value_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=f"^{ENV}='maybe': expected 1 or 0$"):
        graphs_requested()


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_capturable_optimizer_reads_a_learning_rate_the_schedule_fills_in_place(optimizer):
    """A graph keeps pointers, not values: the schedule must change the same lr tensor."""
    cfg = TrainConfig(model="vgg", optimizer=optimizer, schedule="cosine", lr=0.01)
    assert isinstance(capturable_optimizer_args(cfg, torch.device("cpu"))["lr"], torch.Tensor)
    model = nn.Linear(4, 2)
    opt = make_optimizer(cfg, model.parameters(), captured=True)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(0.01)
    scheduler = make_scheduler(cfg, opt, steps_per_epoch=10)
    with pytest.warns(UserWarning):  # the schedule stepped without an optimizer step
        scheduler.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) < 0.01


def test_a_replaced_learning_rate_stops_a_replay():
    cfg = TrainConfig(model="vgg", batch_size=4)
    images, labels = _data(8)
    step = _stepper(cfg, images, True)
    step.static(images, labels, torch.arange(4))
    group = step.optimizer.param_groups[0]
    step.static.lr_tensors = [torch.tensor(group["lr"])]  # as captured: a tensor
    step.static.graph = SimpleNamespace(replay=lambda: None)  # stands in for the capture
    with pytest.raises(RuntimeError, match="replaced after the CUDA graph was captured"):
        step.static(images, labels, torch.arange(4, 8))


def test_asking_for_graphs_on_a_cpu_trains_eagerly_and_says_why(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    images, labels = _data(48)
    files = tuple(f"{i}.npy" for i in range(48))
    dataset = Dataset("synthetic", images, labels, files, "0" * 64)
    result = fit(
        TrainConfig(model="vgg", batch_size=16, epochs=1, device="cpu"), dataset, label="probe"
    )
    assert result.split["step_engine"] == "eager"
    assert "probe eager steps: CUDA graphs need a CUDA device, not cpu" in capsys.readouterr().err


def test_a_run_through_the_static_step_logs_numbers_and_ends_its_schedule(monkeypatch):
    """`fit` as it runs under a CUDA graph, minus the capture (forced on a CPU): the epoch rows
    hold plain numbers (the learning rate is a tensor in the optimizer), the schedule counts
    the whole batches it trains, and the run says how its steps ran."""
    import json

    from experiments.training import graphs

    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(graphs, "graph_blocker", lambda *args: None)
    images, labels = _data(45)
    files = tuple(f"{i}.npy" for i in range(45))
    dataset = Dataset("synthetic", images, labels, files, "0" * 64)
    cfg = TrainConfig(
        model="vgg",
        batch_size=16,
        epochs=3,
        patience=3,
        optimizer="sgd",
        schedule="cosine",
        lr=0.01,
        val_fraction=0.2,
        device="cpu",
    )
    result = fit(cfg, dataset, label="probe")
    assert result.split["step_engine"] == "static buffers"
    json.dumps(result.history)  # what the runner logs: no tensor in a row
    rates = [row["lr"] for row in result.history]
    assert all(type(rate) is float for rate in rates) and rates[0] == pytest.approx(0.01)
    whole = result.split["train_images"] // 16
    assert result.split["train_images"] % 16  # a partial batch, dropped in every epoch
    # cosine over the steps taken (whole batches), read as each epoch begins
    expected = [0.005 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert whole == 2 and rates == pytest.approx(expected)
