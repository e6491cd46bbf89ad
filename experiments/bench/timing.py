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


def matmul_peak(size: int = 1024, repeats: int = 10, dtype: str = "fp32") -> float:
    """Best matrix-multiply FLOP/s of this process's threads in `dtype` (fp32 or bf16)."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], repeats=3) / repeats
    return 2 * size**3 / seconds


def conv_peak(
    channels: int = 64, side: int = 14, batch: int = 128, repeats: int = 10, dtype: str = "fp32"
) -> float:
    """Best FLOP/s of one 3x3 convolution (same padding, channels-last, forward) in `dtype`
    (bf16: under autocast, as training runs), the dense kernel these models spend most of
    their time in; FLOPs counted as 2 x MACs."""
    import torch
    from torch import nn

    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(batch, channels, side, side).to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), autocast:
        for _ in range(3):
            conv(x)
        seconds = timed(lambda: [conv(x) for _ in range(repeats)], repeats=3) / repeats
    return 2.0 * batch * side * side * channels * channels * 9 / seconds


def dense_peaks(dtype: str = "fp32") -> dict[str, float]:
    """FLOP/s of the dense kernels measured in this run in `dtype`; the utilisation limit is
    their best."""
    return {
        f"{dtype} matmul 1024x1024": matmul_peak(dtype=dtype),
        f"{dtype} 3x3 conv, 64 channels, 14x14, batch 128, channels-last": conv_peak(dtype=dtype),
    }


def step_flops(model_name: str, batch: int, **model_kwargs) -> float:
    """FLOPs of one training step at `batch`: 3 x the forward FLOPs (`forward_flops`)."""
    from experiments.training.inference import forward_flops
    from models import create_model

    return 3.0 * batch * forward_flops(create_model(model_name, **model_kwargs))
