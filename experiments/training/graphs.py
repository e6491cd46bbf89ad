"""The training step replayed as one CUDA graph (opt-in: `GLYPH_CUDA_GRAPHS=1`).

A step of these small CNNs on 28x28 images launches a few hundred short kernels; on a GPU the
host's launch time, not the arithmetic, bounds it. `StaticStep` runs every step of an epoch on
fixed input buffers (the last, smaller batch is dropped: `drop_last`, so every step has one
shape and cuDNN's autotuner sees one shape per run). On CUDA it warms up on a side stream, then
captures augmentation, forward, loss, backward and the optimizer's update once and replays
them for every later batch. Elsewhere, or when `graph_blocker` names a reason, it runs the
same step eagerly, so the CPU suite tests everything but the capture itself.

What stays outside the graph, eager, after each replay: the learning-rate schedule (it fills
the optimizer's learning-rate tensor in place, which the graph reads), the EMA update, the
running loss and accuracy sums. What cannot be captured is refused, not approximated:
MixUp / CutMix draw their mixing on the host, `onecycle` cycles the optimizer's momentum as
Python floats and SWA swaps in its own schedule; those runs stay eager (`graph_blocker`).
`make gpu-bench` measures eager and graphed images/s side by side and how far the weights
after graph replays land from those of the same steps run uncaptured.
"""

from __future__ import annotations

import os
import sys

import torch

from experiments.core.settings import TrainConfig
from experiments.training.inference import autocast

ENV = "GLYPH_CUDA_GRAPHS"
WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator, cuDNN, optimizer state)


def graphs_requested() -> bool:
    """`GLYPH_CUDA_GRAPHS`: 1 / 0 (unset: 0). Anything else stops the run with one line."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "0", "no", "false"):
        return False
    if value in ("1", "yes", "true"):
        return True
    raise ValueError(f"{ENV}={value!r}: expected 1 or 0")


def graph_blocker(cfg: TrainConfig, device: torch.device, images: int) -> str | None:
    """Why a run with these settings on `device`, training on `images` images per epoch,
    trains eagerly (None: it can be captured)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if images < cfg.batch_size:
        return f"{images} training images make no whole batch of {cfg.batch_size}"
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        return "MixUp / CutMix draw their mixing on the host"
    if cfg.schedule == "onecycle":
        return "onecycle cycles the optimizer's momentum as Python floats"
    if cfg.swa_start > 0:
        return "SWA replaces the learning-rate schedule mid-run"
    return None


def wants_graph(cfg: TrainConfig, device: torch.device, images: int, label: str) -> bool:
    """Whether this run's steps replay as a CUDA graph: asked for (`GLYPH_CUDA_GRAPHS=1`) and
    possible; when asked for but not possible, one line says why and the run trains eagerly."""
    if not graphs_requested():
        return False
    reason = graph_blocker(cfg, device, images)
    if reason is not None:
        print(f"{label} eager steps: {reason}", file=sys.stderr, flush=True)
    return reason is None


def trained_per_epoch(step, images: int) -> int:
    """The images an epoch trains on: all of them, or whole batches under a static step."""
    return images - images % step.batch_size if step.static is not None else images


def step_engine(step) -> str:
    """How the run's steps ran (logged as `split.step_engine`)."""
    if step.static is None:
        return "eager"
    return "cuda-graph" if step.static.capture else "static buffers"


def capturable_optimizer_args(cfg: TrainConfig, device: torch.device) -> dict:
    """What `make_optimizer` adds for a captured step: the learning rate as a device tensor
    (a Python float would be baked into the graph, so the schedule would not reach it) and
    Adam's capturable mode (its step count on the device); SGD keeps its fused kernel, which
    reads a tensor learning rate on the device."""
    lr = torch.tensor(cfg.lr, device=device)
    if cfg.optimizer in ("adam", "adamw"):
        return {"lr": lr, "capturable": True, "foreach": True}
    return {"lr": lr, "fused": True}


class StaticStep:
    """Every optimizer step of a run on one pair of input buffers, replayed as a CUDA graph
    once `capture` is on and `WARMUP_STEPS` eager steps have run; eager otherwise."""

    def __init__(self, step, capture: bool) -> None:
        self.step = step  # an experiments.training.train.Stepper: model, optimizer, augment
        self.capture = capture
        self.x: torch.Tensor | None = None  # the input buffers, shaped by the first batch
        self.y: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lr_tensors: list[torch.Tensor] = []

    def _body(self, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        x = step.augment(self.x) if step.augment is not None else self.x
        with autocast(self.x.device, step.precision, cache):
            logits = step.model(x)
            loss = step.loss_fn(logits.float(), self.y)
        loss.backward()
        step.optimizer.step()
        return loss.detach(), (logits.argmax(1) == self.y).sum()

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the images at indices `batch`, gathered straight into the
        buffers: (loss, correct), both device tensors."""
        if self.x is None:
            self.x, self.y = images[batch], labels[batch]
        elif len(batch) != len(self.x):
            raise ValueError(f"a static step takes batches of {len(self.x)}, not {len(batch)}")
        else:
            torch.index_select(images, 0, batch, out=self.x)
            torch.index_select(labels, 0, batch, out=self.y)
        self.steps += 1
        if self.graph is not None:
            self._check_lr()
            self.graph.replay()
            return self.outputs
        if not self.capture:
            self.step.optimizer.zero_grad(set_to_none=True)
            return self._body()
        if self.steps <= WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step.optimizer.zero_grad(set_to_none=True)
                out = self._body()
            torch.cuda.current_stream().wait_stream(side)
            return out
        # capture records without running: replay once to train on this batch
        self.step.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._body(cache=False)
        self.lr_tensors = [group["lr"] for group in self.step.optimizer.param_groups]
        self.graph.replay()
        return self.outputs

    def _check_lr(self) -> None:
        groups = self.step.optimizer.param_groups
        if any(group["lr"] is not lr for group, lr in zip(groups, self.lr_tensors, strict=True)):
            raise RuntimeError(
                "the learning rate was replaced after the CUDA graph was captured; the graph "
                f"would keep the old one (unset {ENV} to train eagerly)"
            )


def static_epoch(
    step, images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, progress
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of whole batches in `order` through `step.static`, then the EMA and the
    schedule after each: (summed loss x images, correct, images trained), sums on the device."""
    batch_size = step.batch_size
    trained = len(order) - len(order) % batch_size  # drop_last: one shape per run
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, trained, batch_size):
        loss, right = step.static(images, labels, order[start : start + batch_size])
        if step.averaged is not None:
            step.averaged.update_parameters(step.model)
        if step.scheduler is not None:
            step.scheduler.step()
        total_loss += loss * batch_size
        correct += right
        if progress is not None:
            progress.update(batch_size)
    return total_loss, correct, trained
