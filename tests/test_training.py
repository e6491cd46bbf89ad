"""The training loop, evaluation, MLflow runs and checkpoints on tiny synthetic data."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient
from synthetic import write_study_data

from experiments.cli import main as experiments_main
from experiments.core import config
from experiments.core.preprocess import AUGMENTATIONS
from experiments.core.settings import TrainConfig
from experiments.core.steps import STEPS, get_step, training_step
from experiments.tracking import store
from experiments.training.checkpoint import load_checkpoint
from experiments.training.evaluation import score
from experiments.training.inference import PREDICT_BATCH, predict_logits
from experiments.training.runner import load_step_data, train_and_log
from experiments.training.train import ema_decay_at, ema_warmup_multi_avg_fn, fit
from models import MODELS, create_model

FAST = {"epochs": 3, "batch_size": 32, "lr": 3e-3, "patience": 5}


@pytest.fixture
def larger_data(tmp_path, monkeypatch):
    root = write_study_data(tmp_path / "bigger", per_class=60)
    monkeypatch.setenv("DATA_DIR", str(root))
    return root


def test_trainer_beats_chance_clearly(larger_data):
    data = load_step_data(get_step("task1-step1"))
    result = fit(TrainConfig(model="vgg", **FAST), data.train_set)
    assert result.best_val_acc >= 0.8  # chance is 1/6
    evaluation = score(result.model, result.preprocessing, data.eval_sets["TEST"], result.device)
    assert evaluation.metrics["TEST_black_acc"] >= 0.8
    assert set(evaluation.metrics) >= {"TEST_acc", "TEST_white_acc", "TEST_macro_f1", "TEST_f1_6"}


def test_same_seed_same_metrics_on_cpu(study_data):
    data = load_step_data(get_step("task2-step3"))
    cfg = TrainConfig(model="resnet", augmentation="affine", **FAST)
    first = fit(cfg, data.train_set).history
    second = fit(cfg, data.train_set).history
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_split_is_stratified_and_disjoint():
    from experiments.training.train import split_indices

    labels = torch.arange(6).repeat_interleave(50)
    train, val = split_indices(labels, 0.2, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert torch.bincount(labels[val]).tolist() == [10] * 6
    small, _ = split_indices(labels, 0.2, seed=0, subset=60)
    assert torch.bincount(labels[small]).tolist() == [10] * 6


def test_train2_split_keeps_an_image_and_its_inversion_on_one_side(study_data):
    from data_tools import load_split
    from experiments.training.train import dataset_split, split_indices

    train2 = load_split("TRAIN2", study_data)
    n = len(train2) // 2
    train, val = dataset_split(train2, 0.2, seed=0)
    assert len(train) + len(val) == len(train2) and len(val) == round(0.2 * len(train2))
    source = lambda index: {i % n for i in index.tolist()}  # noqa: E731
    assert not source(train) & source(val)  # no validation image has its twin in training
    assert (
        torch.bincount(train2.labels[val]).tolist()
        == torch.bincount(train2.labels[train2.labels.new_tensor(list(source(val)))])
        .mul(2)
        .tolist()
    )
    # the image-by-image split (no groups) had twins on both sides
    plain_train, plain_val = split_indices(train2.labels, 0.2, seed=0)
    assert source(plain_train) & source(plain_val)
    # a subset of the training side stays inside it: no twin of a validation image either
    small, small_val = dataset_split(train2, 0.2, seed=0, subset=12, val_subset=6)
    assert set(small.tolist()) <= set(train.tolist()) and not source(small) & source(small_val)
    # the groups follow a subset of the dataset
    assert train2.subset(val, "v").groups.tolist() == train2.groups[val].tolist()


def test_augmentation_touches_training_batches_only(study_data, monkeypatch):
    seen = []

    class Destroy(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return torch.zeros_like(x)

    monkeypatch.setitem(AUGMENTATIONS, "destroy", lambda prep: Destroy())
    data = load_step_data(get_step("task1-step1"))
    cfg = TrainConfig(model="vgg", augmentation="destroy", **FAST)
    result = fit(cfg, data.train_set)
    train_images = len(data.train_set) - round(0.2 * len(data.train_set))
    assert sum(seen) == len(result.history) * train_images, (
        "augmented images = training images only"
    )
    seen.clear()
    destroyed = score(result.model, result.preprocessing, data.eval_sets["TEST"], result.device)
    plain_prep = replace(result.preprocessing, augmentation="none")
    plain = score(result.model, plain_prep, data.eval_sets["TEST"], result.device)
    assert seen == [], "evaluation never calls the augmentation"
    assert (destroyed.predictions == plain.predictions).all()


def test_run_is_complete_in_mlflow_and_checkpoint_reproduces_it(study_data, tmp_path, monkeypatch):
    data = load_step_data(get_step("task1-step1"))
    cfg = TrainConfig(model="efficientnet", **FAST)
    outcome = train_and_log(data, cfg, run_name="t")
    store.init()
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["state"] == "COMPLETE"
    assert run.data.tags["step"] == "task1-step1" and run.data.tags["model"] == "efficientnet"
    assert {
        "git_commit",
        "version.torch",
        "data.TRAIN_fingerprint",
        "data.TEST2_fingerprint",
    } <= set(run.data.tags)
    # every resolved setting is logged as the run trained it (FAST's and the defaults alike)
    logged = {key: run.data.params.get(key) for key in cfg.flat()}
    assert logged == {key: str(value) for key, value in cfg.flat().items()}
    assert run.data.params["lr"] == str(FAST["lr"])  # a FAST value, not the default
    history = client.get_metric_history(outcome.run_id, "val_acc")
    assert [m.step for m in history] == list(range(len(outcome.result.history)))
    for key in (
        "best_val_acc",
        "best_epoch",
        "TEST_acc",
        "TEST_black_acc",
        "TEST_white_acc",
        "TEST2_acc",
    ):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "figures")}
    assert {
        "figures/curves.png",
        "figures/confusion_TEST.png",
        "figures/misclassified_TEST2.png",
    } <= artifacts
    uri = run.info.artifact_uri
    assert uri.startswith("file://") and str(config.mlruns_dir()) in uri

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = load_checkpoint(outcome.run_id)
    assert not any(scratch.iterdir())  # the downloaded artifact is not left behind
    predictions = loaded.predict(data.eval_sets["TEST"].images)
    correct = int((predictions == data.eval_sets["TEST"].labels).sum())
    assert correct / len(predictions) == run.data.metrics["TEST_acc"]  # same predictions, exactly
    assert loaded.checkpoint["model"] == "efficientnet"
    assert loaded.checkpoint["epoch"] == int(run.data.metrics["best_epoch"])


def test_failed_run_ends_failed_with_reason(study_data, monkeypatch):
    import experiments.training.runner as runner

    def explode(*args, **kwargs):
        raise RuntimeError("loss is NaN")

    monkeypatch.setattr(runner, "fit", explode)
    data = load_step_data(get_step("task1-step2"))
    with pytest.raises(RuntimeError):
        train_and_log(data, TrainConfig(model="vgg", **FAST), run_name="boom")
    store.init()
    runs = MlflowClient().search_runs([store.experiment_id("task1-step2")])
    assert runs[0].info.status == "FAILED"
    assert (
        runs[0].data.tags["state"] == "FAIL" and "loss is NaN" in runs[0].data.tags["fail_reason"]
    )


@pytest.mark.parametrize("name", [s for s in STEPS if STEPS[s].kind != "reuse"])
def test_every_declared_step_trains_on_tiny_data(study_data, name):
    step = training_step(name)
    data = load_step_data(step)
    trained = f"{step.train_set}-{step.val_set}" if step.val_set else step.train_set
    assert data.train_set.name == trained and set(data.eval_sets) == set(step.eval_sets)
    outcome = train_and_log(
        data, TrainConfig(model="hybrid", epochs=1, batch_size=32), run_name=name, log_figures=False
    )
    loaded = load_checkpoint(outcome.run_id)
    for eval_set, dataset in data.eval_sets.items():
        predicted = loaded.predict(dataset.images)
        accuracy = float((predicted == dataset.labels).float().mean())
        assert outcome.metrics[f"{eval_set}_acc"] == pytest.approx(accuracy)


def test_step_kinds_point_at_consistent_sources():
    for step in STEPS.values():
        if step.kind == "reuse":
            assert step.primary_eval in STEPS[step.source].eval_sets
            assert STEPS[step.source].train_set == step.train_set
        if step.kind == "retrain":  # retrains another study's winner: same training set
            assert STEPS[step.source].train_set == step.train_set and step.settings
        if step.kind == "fine_tune":
            assert STEPS[step.source].kind == "search" and "pretraining" in step.label_use
    labels = [step.row_label for step in STEPS.values()]
    assert len(set(labels)) == len(labels)  # every row of the report says which step it is
    with pytest.raises(ValueError, match="needs a source step"):
        type(STEPS["task2-step1"])("x", "TRAIN", ("TEST",), "d", kind="reuse")
    with pytest.raises(ValueError, match="unknown kind"):
        type(STEPS["task2-step1"])("x", "TRAIN", ("TEST",), "d", kind="magic", source="task1-step1")


def test_cli_train_rejects_unknown_key_with_one_line(study_data):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "train",
            "--step",
            "task1-step1",
            "--model",
            "vgg",
            "--set",
            "nope=1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown setting 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_train_runs_a_step(study_data, capsys):
    code = experiments_main(["train", "--step", "task2-step1", "--model", "vgg", "--epochs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "task2-step1 trains nothing" in out and "TEST2_acc" in out


@pytest.mark.parametrize("step", [s.name for s in STEPS.values() if s.val_set])
def test_task2_steps_validate_on_the_selection_split_and_never_train_on_it(study_data, step):
    from data_tools import SELECTION

    data = load_step_data(get_step(step))
    assert data.val_set is not None and data.val_set.name == SELECTION
    held = {image.numpy().tobytes() for image in data.val_set.images}
    assert not any(image.numpy().tobytes() in held for image in data.train_set.images)
    assert data.train_images == len(data.train_set)


def test_a_task2_run_scores_its_best_epoch_on_the_selection_split(study_data):
    data = load_step_data(get_step("task2-step3"))
    outcome = train_and_log(data, TrainConfig(model="vgg", **FAST), run_name="t")
    store.init()
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.params["split.val_set"] == "SELECT2"
    assert run.data.params["split.train_images"] == str(len(data.train_set)) == "48"
    assert run.data.params["split.val_images"] == "12"
    inputs = {
        d.dataset.name: next(t.value for t in d.tags if t.key == "mlflow.data.context")
        for d in run.inputs.dataset_inputs
    }
    assert inputs["SELECT2"] == "validation"
    predictions = load_checkpoint(outcome.run_id).predict(data.val_set.images)
    accuracy = float((predictions == data.val_set.labels).float().mean())
    assert accuracy == pytest.approx(run.data.metrics["best_val_acc"])


def test_auto_precision_is_bf16_only_for_models_it_speeds_up(monkeypatch):
    import torch

    from experiments.training import inference

    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: True)
    assert inference.training_precision("auto", cpu, "vgg") == "bf16"
    assert inference.training_precision("auto", cpu, "efficientnet") == "fp32"  # CPU_BF16 = False
    assert inference.training_precision("bf16", cpu, "efficientnet") == "bf16"  # asked for: kept
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: False)
    assert inference.training_precision("auto", cpu, "vgg") == "fp32"


def test_weight_averaging_ships_the_validated_average_not_the_last_weights(study_data):
    data = load_step_data(get_step("task2-step3"))
    plain = fit(TrainConfig(model="hybrid", **FAST), data.train_set, val_set=data.val_set)
    averaged = fit(
        TrainConfig(model="hybrid", ema_decay=0.9, **FAST), data.train_set, val_set=data.val_set
    )
    # the same seed trains the same raw weights: only what is validated and kept differs
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in averaged.history]
    assert [r["val_loss"] for r in plain.history] != [r["val_loss"] for r in averaged.history]
    kept = averaged.model.state_dict()
    assert any(not torch.equal(kept[k], v) for k, v in plain.model.state_dict().items())
    # what is returned is what was validated at the kept epoch
    again = score(averaged.model, averaged.preprocessing, data.val_set, averaged.device)
    assert again.metrics[f"{data.val_set.name}_acc"] == pytest.approx(averaged.best_val_acc)


def test_ema_warms_up_so_the_initial_weights_and_batchnorm_statistics_leave_the_average():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 10**6) == 0.999
    torch.manual_seed(0)
    # a BatchNorm layer whose inputs have variance 1e-3, while its running variance starts at 1:
    # 200 training steps, each followed by an update of the average
    for name, fn in [("warm-up", ema_warmup_multi_avg_fn), ("torch", get_ema_multi_avg_fn)]:
        layer = torch.nn.BatchNorm1d(4)
        averaged = AveragedModel(layer, multi_avg_fn=fn(0.999), use_buffers=True)
        for _ in range(200):
            layer(torch.randn(256, 4) * 0.03)
            averaged.update_parameters(layer)
        kept, learnt = averaged.module.running_var, layer.running_var
        assert learnt.max() < 2e-3
        if name == "torch":
            # 0.999**200 = 82 % of the initial 1 is still in the average: it normalises by a
            # standard deviation ~25x the learnt one
            assert kept.min() > 0.5
        else:  # within 10 % of the layer's own statistics; the integer counter copied
            assert torch.allclose(kept, learnt, rtol=0.1)
            assert averaged.module.num_batches_tracked == layer.num_batches_tracked


def test_sgd_without_momentum_is_plain_sgd_and_with_it_nesterov():
    from experiments.training.train import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    plain = make_optimizer(TrainConfig(optimizer="sgd", momentum=0.0), params)
    assert plain.defaults["nesterov"] is False and plain.defaults["momentum"] == 0.0
    plain.step()  # torch refuses Nesterov without a momentum; plain SGD steps
    assert make_optimizer(TrainConfig(optimizer="sgd"), params).defaults["nesterov"] is True


def test_swa_averages_from_its_start_epoch_at_a_tenth_of_the_rate(study_data):
    data = load_step_data(get_step("task2-step3"))
    settings = {**FAST, "epochs": 4, "schedule": "none"}
    plain = fit(TrainConfig(model="hybrid", **settings), data.train_set, val_set=data.val_set)
    swa = fit(
        TrainConfig(model="hybrid", swa_start=0.5, **settings),
        data.train_set,
        val_set=data.val_set,
    )
    # epochs 0-2 train and validate exactly like the plain run (the average of epoch 2's
    # weights alone is those weights); epoch 3 trains at a tenth of lr (SWALR, one anneal
    # epoch), and what is validated is the average of epochs 2 and 3
    for name in ("train_loss", "val_loss"):
        assert [r[name] for r in swa.history[:3]] == [r[name] for r in plain.history[:3]]
    assert swa.history[3]["lr"] == pytest.approx(settings["lr"] * 0.1)
    assert [r["swa_epochs"] for r in swa.history] == [0, 0, 1, 2]  # epochs in the average
    assert "swa_epochs" not in plain.history[0]
    assert swa.history[3]["train_loss"] != plain.history[3]["train_loss"]
    assert swa.history[3]["val_loss"] != plain.history[3]["val_loss"]
    # what is returned is what was validated at the kept epoch
    again = score(swa.model, swa.preprocessing, data.val_set, swa.device)
    assert again.metrics[f"{data.val_set.name}_acc"] == pytest.approx(swa.best_val_acc)
    with pytest.raises(ValueError, match="choose one weight average"):
        TrainConfig(model="hybrid", swa_start=0.5, ema_decay=0.9)
    from experiments.training.train import swa_first_epoch

    # the schedule runs at least one epoch first; a one-epoch run has no SWA
    assert swa_first_epoch(TrainConfig(swa_start=0.75, epochs=30)) == 22
    assert swa_first_epoch(TrainConfig(swa_start=0.1, epochs=2)) == 1
    assert swa_first_epoch(TrainConfig(swa_start=0.5, epochs=1)) is None
    assert swa_first_epoch(TrainConfig(epochs=30)) is None


def test_mixup_and_cutmix_mix_training_batches_only(study_data):
    from experiments.training.train import batch_mixer

    assert batch_mixer(TrainConfig()) is None
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 6
    for knob in ("mixup_alpha", "cutmix_alpha"):
        mixed, targets = batch_mixer(TrainConfig(**{knob: 1.0}))(images, labels)
        assert mixed.shape == images.shape and not torch.equal(mixed, images)
        assert targets.shape == (8, 6) and torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets.max(1).values < 1).any()  # soft targets: two labels per image
    data = load_step_data(get_step("task2-step3"))
    plain = fit(TrainConfig(model="hybrid", **FAST), data.train_set, val_set=data.val_set)
    mixed = fit(
        TrainConfig(model="hybrid", mixup_alpha=0.4, cutmix_alpha=1.0, **FAST),
        data.train_set,
        val_set=data.val_set,
    )
    assert plain.history[0]["train_loss"] != mixed.history[0]["train_loss"]
    again = score(mixed.model, mixed.preprocessing, data.val_set, mixed.device)
    assert again.metrics[f"{data.val_set.name}_acc"] == pytest.approx(mixed.best_val_acc)


def test_elastic_augmentation_moves_strokes_and_keeps_the_shape():
    from experiments.core.preprocess import Preprocessing
    from experiments.search.space import SEARCHED_AUGMENTATIONS

    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 6:22, 13:15] = 1.0  # a vertical stroke
    outputs = {}
    for name in ("affine", "affine_elastic"):
        torch.manual_seed(0)  # the same affine draws: elastic comes after the affine
        outputs[name] = Preprocessing("keep", "none", name, 0.85, 1.0).augmenter()(images)
    out = outputs["affine_elastic"]
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert (out - outputs["affine"]).abs().sum() > 1.0
    assert "affine_elastic" not in SEARCHED_AUGMENTATIONS  # a lever, not searched


def test_prediction_is_fp32_and_training_follows_its_precision():
    """Logged accuracies (scored on the training device) must be what the report's CPU reload
    gives: `predict_logits` never autocasts; `train_one_epoch` autocasts only when asked."""
    from torch import nn

    from experiments.training.inference import predict_logits
    from experiments.training.train import Stepper, train_one_epoch

    class Probe(nn.Module):  # records whether its forward ran under bf16 autocast
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(28 * 28, 6)
            self.autocast: list[bool] = []

        def forward(self, x):
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return self.linear(x.flatten(1))

    probe = Probe()
    images, labels = torch.rand(16, 1, 28, 28), torch.arange(16) % 6
    predict_logits(probe, images)
    assert probe.autocast and not any(probe.autocast)
    for precision, expected in (("bf16", True), ("fp32", False), (None, False)):
        probe.autocast.clear()
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.01)
        step = Stepper(probe, optimizer, nn.CrossEntropyLoss(), 8, torch.Generator().manual_seed(0),
                       precision=precision)  # fmt: skip
        train_one_epoch(step, images, labels)
        assert probe.autocast == [expected, expected]  # two batches of 8


@pytest.mark.parametrize("name", list(MODELS))
def test_prediction_does_not_depend_on_the_batch(name):
    """Validation, evaluation and the report predict in batches of PREDICT_BATCH: in eval mode
    every image's logits are its own, whatever batch it came in (a model left in train mode,
    its batch norm on batch statistics, fails this)."""
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    model.train()
    images = torch.rand(300, 1, 28, 28)
    by_default = predict_logits(model, images)
    assert by_default.shape == (300, 6)
    for batch in (7, PREDICT_BATCH, 1024):  # a kernel may sum in another order per batch
        torch.testing.assert_close(
            predict_logits(model, images, batch), by_default, rtol=1e-4, atol=1e-4
        )
    assert not model.training  # predict_logits put it in eval mode
