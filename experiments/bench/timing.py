"""Timing helpers and the dense-kernel peaks every utilisation figure is measured against."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on `count` torch threads, then give the previous count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def alternately(ways: dict, repeats: int) -> tuple[dict, dict]:
    """Call each of `ways` `repeats` times, alternately, the order swapped every repeat (so
    neither way always runs first): (best seconds per way, every result per way)."""
    best, results = dict.fromkeys(ways, math.inf), {key: [] for key in ways}
    for repeat in range(repeats):
        for key in sorted(ways, reverse=repeat % 2 == 1):
            start = time.perf_counter()
            results[key].append(ways[key]())
            best[key] = min(best[key], time.perf_counter() - start)
    return best, results


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply FLOP/s of this process's threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], repeats=3) / repeats
    return 2 * size**3 / seconds


def conv_peak(channels: int = 64, side: int = 14, batch: int = 128, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of one 3x3 convolution (same padding, channels-last, forward), the
    dense kernel these models spend most of their time in; FLOPs counted as 2 x MACs."""
    import torch
    from torch import nn

    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(batch, channels, side, side).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        seconds = timed(lambda: [conv(x) for _ in range(repeats)], repeats=3) / repeats
    return 2.0 * batch * side * side * channels * channels * 9 / seconds


def dense_peaks() -> dict[str, float]:
    """FLOP/s of the dense kernels measured in this run; the utilisation limit is their best."""
    return {
        "fp32 matmul 1024x1024": matmul_peak(),
        "fp32 3x3 conv, 64 channels, 14x14, batch 128, channels-last": conv_peak(),
    }


def step_flops(model_name: str, batch: int, **model_kwargs) -> float:
    """FLOPs of one training step at `batch`: 3 x the forward FLOPs counted by torch.

    Backward costs two forwards (input and weight gradients). The backward is not
    counted directly because `FlopCounterMode` overcounts a grouped convolution's
    backward by its group count (96x for a 96-channel depthwise 3x3, measured with
    torch 2.14), which would inflate EfficientNet's utilisation several-fold.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import create_model

    model = create_model(model_name, **model_kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 1, 28, 28))
    return 3.0 * float(counter.get_total_flops())
