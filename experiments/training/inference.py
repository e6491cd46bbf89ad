"""A trained model's logits for prepared images: the one prediction path of the project.

The training loop, the evaluation, checkpoints, ensembles and the shift tools all
predict through `predict_logits`, so they share the batch size, eval mode and
mixed-precision rule: prediction is fp32 on every device (so a checkpoint reproduces its
logged accuracy on any CPU); training may use bf16 autocast where the device has it
(`training_precision`).
"""

from __future__ import annotations

import torch
from torch import nn

from experiments.core.machine import cpu_has_bf16
from models import cpu_bf16


def forward_flops(model: nn.Module) -> float:
    """FLOPs of one image's forward pass (torch's `FlopCounterMode`, 2 per multiply-add).

    A training image costs 3x that (the backward's input and weight gradients are counted
    as two more forwards: `FlopCounterMode` overcounts a grouped convolution's backward by
    its group count)."""
    from torch.utils.flop_counter import FlopCounterMode

    training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, 28, 28, device=device).to(memory_format=torch.channels_last))
    finally:
        model.train(training)
    return float(counter.get_total_flops())


def training_precision(precision: str, device: torch.device, model: str | None = None) -> str:
    """The precision a run trains in: `auto` is bf16 where the device has it natively, else
    fp32; on CPU also fp32 for a model that declares bf16 slower there (`models.cpu_bf16`)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fast = model is None or cpu_bf16(model)
    return "bf16" if device.type == "cpu" and cpu_has_bf16() and fast else "fp32"


def autocast(device: torch.device, precision: str | None = None, cache: bool = True):
    """bf16 autocast where `precision` (a training run's resolved one) asks for it. Prediction
    (`precision=None`) is fp32 on every device, so a run's logged accuracy (scored on the
    training device) is what its checkpoint gives when the report reloads it on the CPU.
    `cache=False` under CUDA-graph capture (torch caches no cast weights there)."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache
    )


# Prediction batch on the CPU: on the AVX2-only EPYC, 256 predicted 0.9-2.1x as many images/s
# as the old 1,024 (per model and thread count, three runs; hybrid on one thread measured 0.94x
# once, within this CPU's run-to-run noise), with bit-identical logits (`make bench`, section
# "Prediction batch"). On CUDA, where larger batches keep the device busy, it stays 1,024.
PREDICT_BATCH = 256
CUDA_PREDICT_BATCH = 1024


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Float logits of `model` (eval mode, no gradients) for prepared images, in batches
    (default: `PREDICT_BATCH` on the CPU, `CUDA_PREDICT_BATCH` on CUDA)."""
    batch_size = batch_size or (CUDA_PREDICT_BATCH if images.is_cuda else PREDICT_BATCH)
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(images.device):
            outputs.append(model(images[start : start + batch_size]).float())
    return torch.cat(outputs) if outputs else torch.empty(0, 0, device=images.device)


SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shifted_views(images: torch.Tensor, tta: bool) -> list[torch.Tensor]:
    """The images, and with TTA their four one-pixel shifts (border pixels repeated)."""
    import kornia.geometry.transform as KT

    views = []
    for dx, dy in SHIFTS if tta else SHIFTS[:1]:
        if (dx, dy) == (0, 0):
            views.append(images)
            continue
        translation = torch.tensor(
            [[float(dx), float(dy)]], device=images.device, dtype=images.dtype
        ).expand(len(images), 2)
        views.append(KT.translate(images, translation, padding_mode="border", align_corners=True))
    return views


@torch.no_grad()
def probabilities(loaded, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities of one loaded checkpoint or fitted run (`.model`,
    `.preprocessing`) on raw images, averaged over the one-pixel shifts with TTA. The
    images go to the model's device; the probabilities come back on the CPU."""
    device = next(loaded.model.parameters(), images).device  # a model without weights: as given
    views = shifted_views(images.to(device), tta)
    total = sum(
        predict_logits(loaded.model, loaded.preprocessing.transform(view)).softmax(1)
        for view in views
    )
    return (total / len(views)).cpu()


class ProbabilityCache:
    """Softmax probabilities of runs on one image set: each (run, TTA) pair is predicted once,
    however many ensembles or candidates share it, and not at all when the run logged them
    for this set (`fingerprint`, see `predictions.py`). `load(run_id)` gives a loaded
    checkpoint."""

    def __init__(self, images: torch.Tensor, load, fingerprint: str | None = None):
        self.images, self.load, self.fingerprint = images, load, fingerprint
        self._cache: dict[tuple[str, bool], torch.Tensor] = {}
        self._files: dict[str, dict] = {}  # each run's predictions.npz, downloaded once
        self.predicted = 0  # (run, TTA) pairs that had to be predicted here

    def __call__(self, run_id: str, tta: bool) -> torch.Tensor:
        key = (run_id, tta)
        if key not in self._cache:
            self._cache[key] = self._logged(run_id, tta)
            if self._cache[key] is None:
                self._cache[key] = probabilities(self.load(run_id), self.images, tta)
                self.predicted += 1
        return self._cache[key]

    def _logged(self, run_id: str, tta: bool) -> torch.Tensor | None:
        if self.fingerprint is None:
            return None
        from experiments.training import predictions

        if run_id not in self._files:
            self._files[run_id] = predictions.logged(run_id)
        found = self._files[run_id].get(predictions.key(self.fingerprint, tta))
        if found is None or found.ndim != 2 or len(found) != len(self.images):
            return None  # not logged for these images: predicted from the checkpoint
        return torch.from_numpy(found)

    def accuracy(self, run_ids: list[str], tta: bool, labels: torch.Tensor) -> float:
        """Accuracy of the members' averaged probabilities (one member: the model itself)."""
        return ensemble_accuracy([self(run_id, tta) for run_id in run_ids], labels)


def ensemble_accuracy(members: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the softmax average of `members` (probabilities on the same images)."""
    mean = torch.stack(members).mean(0)
    return float((mean.argmax(1) == labels).double().mean())
