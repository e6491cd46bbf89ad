"""Kernels the project chose by measurement: the prediction batch, the depthwise gradient, torch.compile."""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path

from experiments.bench.timing import alternately, torch_threads
from experiments.bench.training import timed_epochs
from experiments.core import config
from experiments.core.reports import Target

DEPTHWISE_SECTION = "## Depthwise weight gradient (EfficientNet training, CPU)"
DEPTHWISE_TARGET = "depthwise weight gradient: faster, same gradient (rel. 1e-5)"
COMPILE_SECTION = "## torch.compile vs eager (TRAIN images, CPU)"
COMPILE_TARGET = "torch.compile kept only if it wins"
PREDICT_SECTION = "## Prediction batch (TEST images, CPU)"
PREDICT_TARGET = "prediction batch: logits identical to batch 1,024"

PREDICT_OLD_BATCH = 1024  # predict_logits' batch before this section chose PREDICT_BATCH


def bench_predict(root: Path, repeats: int = 3) -> tuple[list[str], bool]:
    """Markdown rows: per model and thread count, prediction images/s of `predict_logits` on
    TEST (prepared by the default config, a default model in eval mode, channels-last) at the
    old batch of 1,024 and at `PREDICT_BATCH`, alternately `repeats` times (best of each), and
    whether the two batches gave bit-identical logits. Returns (rows, every pair identical)."""
    import torch

    from data_tools import load_split
    from experiments.core.settings import TrainConfig
    from experiments.training.inference import PREDICT_BATCH, predict_logits
    from models import MODELS, create_model

    test = load_split("TEST", root, config.cache_dir())
    thread_counts = sorted({1, torch.get_num_threads()})
    rows, identical = [], True
    for name in MODELS:
        torch.manual_seed(0)
        prep = TrainConfig(model=name).preprocessing().fit(test.images)
        x = prep.transform(test.images)
        model = create_model(name).to(memory_format=torch.channels_last).eval()
        for threads in thread_counts:
            with torch_threads(threads):
                for batch in (PREDICT_OLD_BATCH, PREDICT_BATCH):  # warm-up: each batch's shapes
                    predict_logits(model, x[: 2 * batch], batch)
                ways = {
                    b: functools.partial(predict_logits, model, x, b)
                    for b in (PREDICT_OLD_BATCH, PREDICT_BATCH)
                }
                best, results = alternately(ways, repeats)
            rates = {batch: len(x) / seconds for batch, seconds in best.items()}
            logits = {batch: outputs[-1] for batch, outputs in results.items()}
            same = torch.equal(logits[PREDICT_OLD_BATCH], logits[PREDICT_BATCH])
            identical &= same
            ratio = rates[PREDICT_BATCH] / rates[PREDICT_OLD_BATCH]
            rows.append(
                f"| {name} | {threads} | {rates[PREDICT_OLD_BATCH]:,.0f} | "
                f"{rates[PREDICT_BATCH]:,.0f} | {ratio:.2f}x | {'yes' if same else 'no'} |"
            )
            print(
                f"  {name:<13} {threads} thread(s)  {PREDICT_OLD_BATCH}: "
                f"{rates[PREDICT_OLD_BATCH]:7.0f} img/s  {PREDICT_BATCH}: "
                f"{rates[PREDICT_BATCH]:7.0f} img/s  {ratio:4.2f}x  identical: {same}",
                flush=True,
            )
    return rows, identical


# EfficientNet's default and the largest configuration its search space holds
DEPTHWISE_CONFIGS = ({}, {"width_mult": 0.75, "depth_mult": 0.75})


def depthwise_gradient_error() -> float:
    """Largest relative difference between the two weight gradients of every depthwise
    convolution of a default EfficientNet, on one batch of random images."""
    import torch

    from models import create_model
    from models.layers import DepthwiseConv2d, small_map_depthwise

    torch.manual_seed(0)
    model = create_model("efficientnet").to(memory_format=torch.channels_last).train()
    x = torch.randn(64, 1, 28, 28).to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    grads = {}
    for fast in (False, True):
        torch.manual_seed(1)  # the same dropout mask in the classifier both ways
        with small_map_depthwise(fast):
            out = model(x)
        grads[fast] = torch.autograd.grad(out.logsumexp(1).mean(), [c.weight for c in convs])
    return max(
        ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(grads[False], grads[True], strict=True)
    )


def _small_map_shapes() -> dict[tuple[int, int, int, int], int]:
    """(channels, map side, kernel, stride) of each depthwise convolution of a default
    EfficientNet on a map small enough for the batched-matmul gradient, whatever its kernel,
    with how many layers have it."""
    import torch

    from models import create_model
    from models.layers import SMALL_MAP_PIXELS, DepthwiseConv2d

    shapes: dict[tuple[int, int, int, int], int] = {}

    def record(module, args) -> None:  # every kernel size: the table shows why 3x3 is left out
        if args[0].shape[-2] * args[0].shape[-1] <= SMALL_MAP_PIXELS:
            key = (module.in_channels, args[0].shape[-1], module.kernel_size[0], module.stride[0])
            shapes[key] = shapes.get(key, 0) + 1

    model = create_model("efficientnet")
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    with torch.no_grad():
        model(torch.zeros(2, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return shapes


def _weight_grad_ms(channels: int, side: int, kernel: int, stride: int, repeats: int):
    """ms per depthwise weight gradient at batch 128, channels-last: oneDNN's (weight only)
    and `depthwise_weight_grad`'s, best of `repeats`, measured alternately."""
    import torch

    from models.layers import depthwise_weight_grad

    x = torch.randn(128, channels, side, side).to(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel)
    pad = kernel // 2
    grad = torch.randn_like(torch.nn.functional.conv2d(x, weight, None, stride, pad, 1, channels))
    conv_args = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], channels, [False, True, False])
    ways = {
        "onednn": lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, *conv_args),
        "matmul": lambda: depthwise_weight_grad(x, grad, weight.shape, stride, pad),
    }
    for way in ways.values():
        way()  # warm-up
    best, _ = alternately(ways, repeats)
    return 1000 * best["onednn"], 1000 * best["matmul"]


def depthwise_layer_times(repeats: int = 5) -> list[str]:
    """Markdown rows: per depthwise layer shape of a default EfficientNet that takes the
    batched-matmul gradient, ms per weight gradient both ways on one thread."""
    from models.layers import SMALL_MAP_MIN_KERNEL

    rows = []
    with torch_threads(1):
        for (channels, side, kernel, stride), layers in sorted(_small_map_shapes().items()):
            old, new = _weight_grad_ms(channels, side, kernel, stride, repeats)
            used = "yes" if kernel >= SMALL_MAP_MIN_KERNEL else "no"
            rows.append(
                f"| {kernel}x{kernel} | {channels} | {side}x{side} | {stride} | {layers} | "
                f"{old:.2f} | {new:.2f} | {old / new:.1f}x | {used} |"
            )
    return rows


def bench_depthwise(root: Path, images: int, repeats: int = 2) -> tuple[list[str], float]:
    """Markdown rows: EfficientNet's training images/s with oneDNN's depthwise weight gradient
    and with the batched-matmul one (`models.layers.DepthwiseConv2d`), alternately (best of
    `repeats`), per configuration and thread count; returns the rows and the smallest speed-up."""
    import torch

    from data_tools import load_split
    from models.layers import small_map_depthwise

    train_set = load_split("TRAIN", root, config.cache_dir())

    def epoch_rate(fast: bool, kwargs: dict) -> float:  # the timed epoch's images/s
        with small_map_depthwise(fast):
            return timed_epochs("efficientnet", train_set, images, "fp32", model_kwargs=kwargs)[1]

    rows, slowest = [], math.inf
    for kwargs in DEPTHWISE_CONFIGS:
        for threads in sorted({1, torch.get_num_threads()}):
            with torch_threads(threads):
                ways = {fast: functools.partial(epoch_rate, fast, kwargs) for fast in (False, True)}
                _, results = alternately(ways, repeats)
            rates = {fast: max(values) for fast, values in results.items()}
            ratio = rates[True] / rates[False]
            slowest = min(slowest, ratio)
            label = ", ".join(f"{k} {v}" for k, v in kwargs.items()) or "default"
            rows.append(
                f"| {label} | {threads} | {rates[False]:,.0f} | {rates[True]:,.0f} | {ratio:.2f}x |"
            )
            print(
                f"  efficientnet {label:<30} {threads} thread(s)  oneDNN {rates[False]:6.0f} "
                f"img/s  matmul {rates[True]:6.0f} img/s  {ratio:4.2f}x",
                flush=True,
            )
    return rows, slowest


def compile_break_even(eager_rate: float, compiled_rate: float, compile_s: float) -> float:
    """Training images after which `torch.compile` pays for its compile time (inf: never)."""
    saved_per_image = 1 / eager_rate - 1 / compiled_rate
    return compile_s / saved_per_image if saved_per_image > 0 else math.inf


def bench_compile(root: Path, images: int, final_images: int) -> tuple[list[str], bool]:
    """Markdown rows: per model, eager vs `torch.compile` training images/s (default config,
    the precision `auto` picks, one epoch over `images` after a warm-up), the compile time
    (the first batches' extra time over eager), the images after which compiling pays, and
    what a default final of `final_images` images costs each way, compile included. Returns
    the rows and whether compiling won for every model."""
    import torch

    from data_tools import load_split
    from experiments.training.inference import training_precision
    from models import MODELS

    train_set = load_split("TRAIN", root, config.cache_dir())
    rows, wins = [], []
    for name in MODELS:
        precision = training_precision("auto", torch.device("cpu"), name)
        eager_warm, eager, batch = timed_epochs(name, train_set, images, precision)
        with tempfile.TemporaryDirectory() as cold:  # inductor's on-disk cache empty: a run's
            previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # first compile, as on CI
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
            try:
                compiled_warm, compiled, _ = timed_epochs(name, train_set, images, precision, True)
            finally:
                if previous is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
        warm = min(images, 4 * batch)
        compile_s = max(0.0, compiled_warm - warm / compiled - (eager_warm - warm / eager))
        even = compile_break_even(eager, compiled, compile_s)
        eager_final = final_images / eager
        compiled_final = compile_s + final_images / compiled
        wins.append(compiled_final < eager_final)
        shown = "never" if math.isinf(even) else f"{even:,.0f}"
        rows.append(
            f"| {name} | {precision} | {eager:,.0f} | {compiled:,.0f} | {compiled / eager:.2f}x "
            f"| {compile_s:.0f} s | {shown} | {eager_final:.0f} s | {compiled_final:.0f} s |"
        )
        print(
            f"  {name:<13} eager {eager:6.0f} img/s  compiled {compiled:6.0f} img/s  compile "
            f"{compile_s:5.1f} s  final {eager_final:.0f} vs {compiled_final:.0f} s",
            flush=True,
        )
    return rows, all(wins)


def predict_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """Prediction batch: the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
    from experiments.training.inference import PREDICT_BATCH

    print("prediction batch: 1,024 vs the default, on TEST ...", flush=True)
    rows, identical = bench_predict(config.data_dir())
    lines += [
        PREDICT_SECTION,
        "",
        measured_on,
        "",
        "`predict_logits` (every validation pass, evaluation and report prediction) on the "
        "6,000 TEST images, prepared by the default config; a default model of each kind in "
        f"eval mode, channels-last, fp32; batch {PREDICT_OLD_BATCH:,} (the old default) and "
        f"{PREDICT_BATCH} (the default now), measured alternately three times, the order swapped each time (best of "
        "each), on one thread (as `make reproduce` runs its two jobs) and on every thread. "
        "*identical*: the two batches gave bit-identical logits (`torch.equal`).",
        "",
        f"| model | threads | batch {PREDICT_OLD_BATCH:,} img/s | batch {PREDICT_BATCH} img/s "
        "| speed-up | identical |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    targets.append(
        (
            PREDICT_TARGET,
            "identical" if identical else "differ",
            identical,
        )
    )
    return lines, targets


def depthwise_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """Depthwise weight gradient: the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
    from models.layers import SMALL_MAP_MIN_KERNEL, SMALL_MAP_PIXELS

    images = int(os.environ.get("BENCH_IMAGES", "2560"))
    print(f"depthwise weight gradient: oneDNN vs batched matmul, {images} images ...", flush=True)
    repeats = 2
    rows, slowest = bench_depthwise(config.data_dir(), images, repeats)
    layer_rows = depthwise_layer_times()
    error = depthwise_gradient_error()
    print(f"  largest relative weight-gradient difference: {error:.1e}", flush=True)
    lines += [
        DEPTHWISE_SECTION,
        "",
        measured_on,
        "",
        "One training epoch of EfficientNet on TRAIN images (default settings, fp32, "
        f"channels-last, batch 128, {images} images after a warm-up), with oneDNN's weight "
        "gradient for every depthwise convolution and with `DepthwiseConv2d`'s (one batched "
        f"matmul per layer for kernels of at least {SMALL_MAP_MIN_KERNEL}x{SMALL_MAP_MIN_KERNEL} "
        f"on maps of at most {SMALL_MAP_PIXELS} pixels: the 5x5 layers on the 4x4 maps of "
        f"the last stages), measured alternately {repeats} times (best of each), the order "
        "swapped, on one thread (as `make reproduce` runs its two jobs) and on every "
        "thread. The forward "
        "pass and the input gradient are conv2d's own either way. Largest relative "
        f"difference between the two weight gradients of a default model on one batch: "
        f"{error:.1e} (float summation order).",
        "",
        "| configuration | threads | oneDNN img/s | batched matmul img/s | speed-up |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Per depthwise layer shape of the default model on a map that small: the weight "
        "gradient alone, ms per call (batch 128, one thread, best of 5, alternately); "
        "*layers*: how many of the model's depthwise convolutions have that shape; "
        f"*used*: whether the batched matmul is taken (kernels of {SMALL_MAP_MIN_KERNEL} "
        "and more; 3x3 kernels keep oneDNN, faster for them).",
        "",
        "| kernel | channels | map | stride | layers | oneDNN ms | batched matmul ms | "
        "speed-up | used |",
        "|---|---|---|---|---|---|---|---|---|",
        *layer_rows,
        "",
    ]
    targets.append(
        (DEPTHWISE_TARGET, f"{slowest:.2f}x, {error:.0e}", slowest > 1.0 and error <= 1e-5)
    )
    return lines, targets


def compile_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """torch.compile vs eager: the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
    import torch

    images = int(os.environ.get("BENCH_IMAGES", "2560"))
    final = 86_400  # a default TRAIN final: 3 epochs of 28,800 images (Budget, cpu profile)
    print(f"torch.compile vs eager, {images} images ...", flush=True)
    rows, won = bench_compile(config.data_dir(), images, final)
    lines += [
        COMPILE_SECTION,
        "",
        measured_on,
        "",
        f"Default config, channels-last, batch 128, the precision `auto` picks, "
        f"{torch.get_num_threads()} thread(s), {images} images after a 512-image warm-up "
        "(torch.compile's default mode, inductor). Compile time: the warm-up's extra time "
        "over eager, with inductor's on-disk cache empty (a warm cache, left by a compile "
        "of the same graph, cuts it to about a second). Every run builds a new model (trials differ in width and depth), so "
        f"each pays its compile; the last two columns are a default TRAIN final ({final:,} "
        "images) each way, compile included, training only (its validation passes would "
        "compile the eval graph too).",
        "",
        "| model | precision | eager img/s | compiled img/s | speed-up | compile | pays after "
        "(images) | final, eager | final, compiled |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Verdict: "
        + (
            "compiling wins for every model, compile included."
            if won
            else "not kept: compiling does not win for every model once its compile time "
            "is counted, so runs stay eager."
        ),
        "",
    ]
    targets.append((COMPILE_TARGET, "wins" if won else "not kept", True))
    return lines, targets
