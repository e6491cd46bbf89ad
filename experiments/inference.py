"""A trained model's logits for prepared images: the one prediction path of the project.

The training loop, the evaluation, checkpoints, ensembles and the shift tools all
predict through `predict_logits`, so they share the batch size, eval mode and
mixed-precision rule.
"""

from __future__ import annotations

import torch
from torch import nn


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Float logits of `model` (eval mode, no gradients) for prepared images, in batches."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(images.device):
            outputs.append(model(images[start : start + batch_size]).float())
    return torch.cat(outputs) if outputs else torch.empty(0, 0)
