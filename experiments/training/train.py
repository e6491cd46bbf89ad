"""The training loop: one `fit()` readable top to bottom, with `train_one_epoch()` and `evaluate()`.

Data are in-memory tensors, moved once to the device. Each epoch produces one
flat metrics row that goes to every sink: the `on_epoch` callbacks (MLflow,
Optuna pruning) and the progress display. Early stopping watches the
validation loss; the best epoch's weights are restored at the end. Nothing
here sees an evaluation set: those are scored afterwards by `evaluation.py`.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_swa_avg_fn
from tqdm.auto import tqdm

from data_tools import NUM_CLASSES, Dataset
from experiments.core.preprocess import Preprocessing
from experiments.core.settings import TrainConfig, resolve_device
from experiments.training.checkpoint import Loaded, load_checkpoint
from experiments.training.graphs import (
    StaticStep,
    capturable_optimizer_args,
    static_epoch,
    step_engine,
    trained_per_epoch,
    wants_graph,
)
from experiments.training.inference import autocast, predict_logits, training_precision
from experiments.training.resume import restore, resumable, save
from models import create_model


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run ends FAILED with `fail_reason=diverged`."""

    def __init__(self, detail: str):
        super().__init__(f"diverged: {detail}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds libraries that use the global generator)
    torch.manual_seed(seed)


def split_indices(
    labels: torch.Tensor,
    val_fraction: float,
    seed: int,
    subset: int = 0,
    val_subset: int = 0,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified train/validation split; `subset` / `val_subset` > 0 keep that many (stratified).

    The subsets are drawn inside the full split, so a trial's validation images
    are never training images of the final retrain's split, and vice versa.
    With `groups` (a dataset's `groups`: TRAIN2's image and its inversion share one), whole
    groups go to one side, split stratified by their label, so no validation image has a
    version of itself in training; without, each image is its own group (the same split).
    """
    index = np.arange(len(labels))
    y = labels.numpy()
    if groups is None:
        train, val = train_test_split(index, test_size=val_fraction, stratify=y, random_state=seed)
    else:
        train, val = _group_split(groups.numpy(), y, val_fraction, seed)
    if 0 < subset < len(train):
        train, _ = train_test_split(train, train_size=subset, stratify=y[train], random_state=seed)
    if 0 < val_subset < len(val):
        val, _ = train_test_split(val, train_size=val_subset, stratify=y[val], random_state=seed)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


def _group_split(
    groups: np.ndarray, y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image indices of a stratified split of the groups (every image of a group has its label)."""
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if not (y == y[first][inverse]).all():
        raise ValueError("split groups: the images of a group must share one label")
    train_groups, _ = train_test_split(
        names, test_size=val_fraction, stratify=y[first], random_state=seed
    )
    in_train = np.isin(groups, train_groups)
    index = np.arange(len(groups))
    return index[in_train], index[~in_train]


def dataset_split(
    dataset: Dataset, val_fraction: float, seed: int, subset: int = 0, val_subset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`split_indices` of a dataset, its groups kept on one side."""
    return split_indices(dataset.labels, val_fraction, seed, subset, val_subset, dataset.groups)


def subset_indices(labels: torch.Tensor, subset: int, seed: int) -> torch.Tensor:
    """All indices, or a stratified `subset` of them when 0 < subset < len(labels)."""
    index = np.arange(len(labels))
    if 0 < subset < len(index):
        index, _ = train_test_split(
            index, train_size=subset, stratify=labels.numpy(), random_state=seed
        )
    return torch.from_numpy(np.sort(index))


def preprocessing_for(
    cfg: TrainConfig, train_images: torch.Tensor, source: Loaded | None = None
) -> Preprocessing:
    """The run's preprocessing, its normalization statistics fitted on `train_images`; a
    fine-tune (`source`: its `init_from` checkpoint) with the pretrained run's polarity and
    normalization keeps that run's statistics, which its weights were trained with."""
    prep = cfg.preprocessing()
    if source is not None:
        pretrained = source.preprocessing
        if (pretrained.polarity, pretrained.normalization) == (prep.polarity, prep.normalization):
            return replace(prep, mean=pretrained.mean, std=pretrained.std)
    return prep.fit(train_images)


def load_pretrained(model: nn.Module, cfg: TrainConfig, source: Loaded | None = None) -> None:
    """Copy the weights of `cfg.init_from` (`source`, when already loaded) into `model`, then
    freeze what `cfg.freeze` says.

    `early` freezes the first half of the body's parameter tensors (in layer
    order), `body` every parameter outside `model.head` (a linear probe). Frozen
    layers' batch-norm statistics still follow the new data (train mode).
    """
    source = source or load_checkpoint(cfg.init_from)
    if source.checkpoint["model"] != cfg.model:
        raise ValueError(
            f"init_from {cfg.init_from}: a {source.checkpoint['model']} checkpoint, not {cfg.model}"
        )
    try:
        model.load_state_dict(source.model.state_dict())
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(
            f"init_from {cfg.init_from}: weights do not fit {cfg.model}({cfg.model_kwargs}): {first}"
        ) from None
    # the registry contract (models/__init__.py): everything outside `head` is the body
    body = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    frozen = {"none": [], "early": body[: len(body) // 2], "body": body}[cfg.freeze]
    for parameter in frozen:
        parameter.requires_grad_(False)


def make_optimizer(cfg: TrainConfig, params, captured: bool = False) -> torch.optim.Optimizer:
    """The run's optimizer; `captured`: one a CUDA graph can replay (graphs.py)."""
    params = [p for p in params if p.requires_grad]
    # on CUDA one fused kernel updates every parameter (the CPU keeps torch's default
    # foreach path, so CPU runs give the numbers they always gave)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    lr = cfg.lr
    if captured:
        fused = capturable_optimizer_args(cfg, params[0].device)
        lr = fused.pop("lr")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **fused)
    # Nesterov needs a momentum: momentum=0 is plain SGD
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        **fused,
    )


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """A per-batch schedule over the whole epoch budget (None for a constant rate).

    `onecycle` is torch's 1cycle policy whole: it also cycles the momentum (SGD's momentum,
    Adam's beta1) from 0.95 down to 0.85 and back, so `momentum` does not apply with it.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return None


@dataclass
class Stepper:
    """What an optimizer step needs besides its batch. `averaged` (EMA) is updated after every
    step; `mixer` (MixUp / CutMix) turns each augmented batch and its labels into mixed
    images and soft targets; `scheduler` steps after every optimizer step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    batch_size: int
    generator: torch.Generator
    scheduler: Any = None
    augment: nn.Module | None = None
    precision: str | None = None
    averaged: AveragedModel | None = None
    mixer: Callable | None = None
    static: StaticStep | None = None  # every step on fixed buffers (a CUDA graph: graphs.py)


def train_one_epoch(
    step: Stepper, images: torch.Tensor, labels: torch.Tensor, progress: tqdm | None = None
) -> tuple[float, float]:
    """One pass over the training images in random order; returns (mean loss, accuracy).
    The accuracy counts the argmax against the batch's own labels (before any mixing). With
    `step.static` (graphs.py) it trains whole batches only, through the static step."""
    model, optimizer, scheduler = step.model, step.optimizer, step.scheduler
    augment, mixer, averaged = step.augment, step.mixer, step.averaged
    batch_size, loss_fn, generator, precision = (
        step.batch_size,
        step.loss_fn,
        step.generator,
        step.precision,
    )
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    if step.static is not None:
        total_loss, correct, n = static_epoch(step, images, labels, order, progress)
        return _epoch_means(total_loss, correct, n)
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        x, y = images[batch], labels[batch]
        if augment is not None:
            x = augment(x)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        with autocast(images.device, precision):
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if averaged is not None:
            averaged.update_parameters(model)
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach() * len(batch)
        correct += (logits.argmax(1) == y).sum()
        if progress is not None:
            progress.update(len(batch))
    return _epoch_means(total_loss, correct, len(labels))


def _epoch_means(total_loss: torch.Tensor, correct: torch.Tensor, n: int) -> tuple[float, float]:
    mean_loss = float(total_loss) / n  # one host sync per epoch, not per batch
    if not math.isfinite(mean_loss):
        raise Diverged(f"training loss is {mean_loss}; try a lower learning rate")
    return mean_loss, float(correct) / n


SWA_LR_FACTOR = 0.1  # SWA holds the learning rate at this fraction of `lr`


def batch_mixer(cfg: TrainConfig, num_classes: int = NUM_CLASSES) -> Callable | None:
    """MixUp and / or CutMix of training batches (torchvision.transforms.v2; one of the two
    per batch when both are on), or None when both alphas are 0."""
    from torchvision.transforms import v2

    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay of the update after `updates` earlier ones: `min(decay, (1 + n) / (10 + n))`
    (the warm-up of TensorFlow's ExponentialMovingAverage and timm's ModelEmaV3)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_warmup_multi_avg_fn(decay: float) -> Callable:
    """An EMA update for `AveragedModel(multi_avg_fn=...)` whose decay warms up (`ema_decay_at`).

    torch's `get_ema_multi_avg_fn` applies `decay` from the first update on, so the average
    keeps `decay ** n` of the initial weights and of BatchNorm's initial running variance (1)
    after n updates: at 0.995 after 675 steps (3 epochs of TRAIN) that is 3 %, and in layers
    whose activations have a variance near 0.001 it divides by sqrt(0.035) where sqrt(0.001)
    was learnt. EfficientNet's average then stayed at chance accuracy (validation 0.167 for
    three epochs) while its weights reached 0.95. With the warm-up the initial weights are gone
    within a few updates. Integer buffers (BatchNorm's `num_batches_tracked`) take the
    model's value.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        if not (torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0])):
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
            return
        weight = 1.0 - ema_decay_at(decay, int(n_averaged))
        torch._foreach_lerp_(averaged, current, weight)

    return update


def swa_first_epoch(cfg: TrainConfig) -> int | None:
    """The first epoch whose weights enter the SWA average: at least epoch 1, so that the
    schedule has run for an epoch (None: SWA off, or a run of one epoch). As in every run,
    validation loss picks the kept epoch, an averaged one or not, and `patience` may end
    a run before its SWA epochs."""
    if cfg.swa_start <= 0 or cfg.epochs < 2:
        return None
    return min(cfg.epochs - 1, max(1, int(cfg.swa_start * cfg.epochs)))


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module
) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on prepared images; no gradients, eval mode."""
    logits = predict_logits(model, images)
    loss = float(loss_fn(logits, labels))
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return loss, accuracy


@dataclass
class FitResult:
    model: nn.Module
    preprocessing: Preprocessing
    config: TrainConfig
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    best_val_acc: float
    split: dict[str, Any]
    device: torch.device


def _show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class WeightAverage:
    """Which weights are validated, kept and returned: the model's own, an EMA of them
    (`ema_decay`, updated every step) or, from `swa_first_epoch` on, SWA's uniform average of
    each epoch's weights at a constant low learning rate (BatchNorm statistics averaged too:
    `use_buffers`)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, optimizer, label: str) -> None:
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.averaged: AveragedModel | None = None
        if cfg.ema_decay > 0:
            ema = ema_warmup_multi_avg_fn(cfg.ema_decay)
            self.averaged = AveragedModel(model, multi_avg_fn=ema, use_buffers=True)
        self.swa_from, self.swa_scheduler = swa_first_epoch(cfg), None
        if self.swa_from is not None and cfg.patience < cfg.epochs - 1:
            print(
                f"{label} swa_start={cfg.swa_start}: averaging from epoch {self.swa_from} of "
                f"{cfg.epochs}, but patience {cfg.patience} may stop the run before or early "
                "in it (metric swa_epochs: the epochs averaged)",
                file=sys.stderr,
                flush=True,
            )

    @property
    def scored(self) -> nn.Module:
        return self.averaged.module if self.averaged is not None else self.model

    def begin_epoch(self, epoch: int) -> bool:
        """True when `epoch` is an SWA epoch (its average starts with the first one)."""
        in_swa = self.swa_from is not None and epoch >= self.swa_from
        if in_swa and self.swa_scheduler is None:
            self.swa_scheduler = SWALR(
                self.optimizer, swa_lr=self.cfg.lr * SWA_LR_FACTOR, anneal_epochs=1
            )
            # the per-tensor average: the batched one fails on CUDA for integer buffers
            # (BatchNorm's num_batches_tracked: "Integer division with addcdiv")
            self.averaged = AveragedModel(self.model, avg_fn=get_swa_avg_fn(), use_buffers=True)
        return in_swa

    def end_epoch(self, in_swa: bool) -> dict[str, int]:
        """Average an SWA epoch's weights; the row's `swa_epochs` where SWA is on."""
        if in_swa:
            self.averaged.update_parameters(self.model)
            self.swa_scheduler.step()
        if self.swa_from is None:
            return {}
        return {"swa_epochs": int(self.averaged.n_averaged) if in_swa else 0}


class BestEpoch:
    """The epoch of lowest validation loss so far, with a copy of the weights it scored."""

    def __init__(self) -> None:
        self.loss, self.acc, self.epoch, self.state = math.inf, 0.0, -1, None

    def offer(self, row: dict[str, float], scored: nn.Module) -> None:
        if row["val_loss"] < self.loss:
            self.loss, self.acc, self.epoch = row["val_loss"], row["val_acc"], int(row["epoch"])
            self.state = copy.deepcopy(scored.state_dict())

    def patience_spent(self, epoch: int, patience: int) -> bool:
        return epoch - self.epoch >= patience


@dataclass
class FitData:
    """A run's prepared tensors on its device, and where they came from."""

    prep: Preprocessing
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    train_images: int
    val_images: int
    source: Loaded | None


def prepare_data(
    cfg: TrainConfig, train_set: Dataset, val_set: Dataset | None, device: torch.device
) -> FitData:
    """Split (or subset) the images, fit the preprocessing on the training side (a fine-tune:
    the pretrained run's), and move the prepared tensors to `device` once."""
    if val_set is None:
        train_idx, val_idx = dataset_split(
            train_set, cfg.val_fraction, cfg.split_seed, cfg.train_subset, cfg.val_subset
        )
        val_images, val_labels = train_set.images[val_idx], train_set.labels[val_idx]
    else:
        train_idx = subset_indices(train_set.labels, cfg.train_subset, cfg.split_seed)
        val_idx = subset_indices(val_set.labels, cfg.val_subset, cfg.split_seed)
        val_images, val_labels = val_set.images[val_idx], val_set.labels[val_idx]
    source = load_checkpoint(cfg.init_from) if cfg.init_from else None  # a fine-tune's start
    prep = preprocessing_for(cfg, train_set.images[train_idx], source)
    x_train = prep.transform(train_set.images[train_idx]).to(device)
    y_train = train_set.labels[train_idx].to(device)
    x_val = prep.transform(val_images).to(device)
    return FitData(
        prep, x_train, y_train, x_val, val_labels.to(device), len(train_idx), len(val_idx), source
    )


def _epoch(
    epoch: int, step: Stepper, data: FitData, average: WeightAverage, label: str
) -> dict[str, float]:
    """Train one epoch and validate the weights that would be kept: the epoch's metrics row."""
    start = time.perf_counter()
    progress = None
    if _show_progress():
        progress = tqdm(
            total=trained_per_epoch(step, len(data.y_train)),
            desc=f"{label} epoch {epoch}",
            unit="img",
            leave=False,
        )
    in_swa = average.begin_epoch(epoch)
    lr = float(step.optimizer.param_groups[0]["lr"])  # a device tensor under a CUDA graph
    this_epoch = replace(step, scheduler=None, averaged=None) if in_swa else step
    train_loss, train_acc = train_one_epoch(this_epoch, data.x_train, data.y_train, progress)
    swa = average.end_epoch(in_swa)
    val_loss, val_acc = evaluate(average.scored, data.x_val, data.y_val, nn.CrossEntropyLoss())
    if progress is not None:
        progress.close()
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": lr,
        "epoch_seconds": time.perf_counter() - start,
        **swa,
    }
    print(
        f"{label} epoch {epoch:>2}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
        f"val loss {val_loss:.4f} acc {val_acc:.4f} | {row['epoch_seconds']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    if not math.isfinite(val_loss):
        raise Diverged(f"validation loss is {val_loss} at epoch {epoch}")
    return row


def _stepper(cfg: TrainConfig, data: FitData, device, precision, label: str) -> Stepper:
    """The run's model (on `device`, channels-last, its pretrained weights loaded), optimizer,
    schedule, augmentation, weight average and, under `GLYPH_CUDA_GRAPHS=1`, static step."""
    augment = data.prep.augmenter()
    # channels-last activations: 1.3-1.6x faster convolutions on CPU (measured by `make bench`)
    model = create_model(cfg.model, **cfg.model_kwargs).to(
        device, memory_format=torch.channels_last
    )
    if cfg.init_from:
        load_pretrained(model, cfg, data.source)
    captured = wants_graph(cfg, device, len(data.y_train), label)
    optimizer = make_optimizer(cfg, model.parameters(), captured)
    # a static step drops the last partial batch: the schedule counts the steps it takes
    whole, partial = divmod(len(data.y_train), cfg.batch_size)
    steps_per_epoch = whole if captured else whole + (partial > 0)
    step = Stepper(
        model,
        optimizer,
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        cfg.batch_size,
        torch.Generator().manual_seed(cfg.seed),
        scheduler=make_scheduler(cfg, optimizer, steps_per_epoch),
        augment=augment.to(device) if augment is not None else None,
        precision=precision,
    )
    step.mixer = batch_mixer(cfg)
    step.static = StaticStep(step, capture=device.type == "cuda") if captured else None
    return step


def fit(
    cfg: TrainConfig,
    train_set: Dataset,
    on_epoch: Iterable[Callable[[dict[str, float]], None]] = (),
    label: str = "",
    val_set: Dataset | None = None,
    resume: Path | None = None,
) -> FitResult:
    """Train `cfg.model`; stop early on validation loss; restore the best epoch.

    Validation is `val_set` when given (all of `train_set` trains), else a stratified
    split of `train_set` (`val_fraction`, `split_seed`). `resume`: where the run's state is
    kept after each epoch and read back at the start (resume.py); the restored epochs' rows
    go to the sinks again, so a new tracked run gets the whole curve.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = training_precision(cfg.precision, device, cfg.model)
    data = prepare_data(cfg, train_set, val_set, device)
    step = _stepper(cfg, data, device, precision, label)
    average = WeightAverage(cfg, step.model, step.optimizer, label)
    step.averaged = average.averaged
    best = BestEpoch()
    resume = resume if resume is not None and resumable(cfg) else None
    start, history = restore(resume, step, average, best, label) if resume else (0, [])
    for row in history:
        for sink in on_epoch:
            sink(row)
    for epoch in range(start, cfg.epochs):
        row = _epoch(epoch, step, data, average, label)
        history.append(row)
        best.offer(row, average.scored)
        for sink in on_epoch:
            sink(row)  # may raise optuna.TrialPruned
        if best.patience_spent(epoch, cfg.patience):
            break
        if resume is not None and epoch + 1 < cfg.epochs:
            save(resume, epoch, step, average, best, history)
    step.model.load_state_dict(best.state)
    split = {
        "val_set": val_set.name if val_set is not None else "split of the training set",
        "val_fraction": cfg.val_fraction if val_set is None else 0.0,
        "split_seed": cfg.split_seed,
        "train_images": data.train_images,
        "val_images": data.val_images,
        "precision_used": precision,
        "step_engine": step_engine(step),
        **({"resumed_at_epoch": start} if start else {}),
    }
    return FitResult(
        step.model, data.prep, cfg, history, best.epoch, best.loss, best.acc, split, device
    )
