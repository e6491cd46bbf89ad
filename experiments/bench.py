"""`python -m experiments bench`: speed measured side by side in one run, written to reports/bench.md.

Training section: for each model, the reference pipeline (a `Dataset` that
calls `np.load` per sample every epoch, a `DataLoader` with batch 64,
per-sample transforms, NCHW) rebuilt here for comparison only, against this
project's (in-memory tensors, batched augmentation, channels-last, batch 128),
same model and same number of images; model-FLOP utilisation (training-step
FLOPs counted by `FlopCounterMode` x steps/s, over the best FLOP/s of the
dense kernels measured in the same run: an fp32 matmul and a channels-last 3x3
convolution); and the share of a trial's time spent in MLflow.

Data section: reading the three raw datasets (48,000 files on the shipped
data) three ways in the same process:
  1. the plain loop, one `np.load(allow_pickle=False)` per file (the baseline);
  2. this project's cold read (no dataset cache): raw bytes + one decode per header group;
  3. this project's warm load (content-keyed cache hit).
When the process may drop the OS page cache (root on Linux), the plain loop
and the cold read are also timed with the page cache dropped first.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_tools.cache import load_cached
from data_tools.datasets import NUM_CLASSES, RAW_SPLITS
from data_tools.reader import list_files, read_dataset
from experiments import config
from experiments.steps import RECIPE, RECIPE_MODELS


def _timed(fn: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _drop_page_cache() -> bool:
    if os.environ.get("BENCH_DROP_CACHES", "1") == "0":
        return False
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_data(root: Path) -> list[tuple[str, float, str]]:
    """Rows of (measurement, seconds, note)."""
    roots = [root / name for name in RAW_SPLITS]
    files = [path for split in roots for path, _ in list_files(split, NUM_CLASSES)]

    def plain() -> None:
        for path in files:
            np.load(path, allow_pickle=False)

    def cold() -> None:
        for split in roots:
            read_dataset(split, NUM_CLASSES)

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for split in roots:
            load_cached(split, cache, NUM_CLASSES)  # fill the cache

        def warm() -> None:
            for split in roots:
                load_cached(split, cache, NUM_CLASSES)

        t_plain = _timed(plain)
        t_cold = _timed(cold, repeats=2)
        t_warm = _timed(warm, repeats=3)
    n = len(files)
    rows.append((f"plain np.load loop, {n:,} files (page cache warm)", t_plain, "baseline"))
    rows.append(
        ("cold read, no dataset cache (page cache warm)", t_cold, f"{t_plain / t_cold:.1f}x faster")
    )
    rows.append(("warm load, dataset cache hit", t_warm, f"{t_plain / t_warm:.1f}x faster"))
    if _drop_page_cache():
        t_plain_disk = _timed(plain)
        _drop_page_cache()
        t_cold_disk = _timed(cold)
        rows.append(("plain np.load loop, page cache dropped", t_plain_disk, "baseline"))
        rows.append(
            (
                "cold read, page cache dropped",
                t_cold_disk,
                f"{t_plain_disk / t_cold_disk:.1f}x faster",
            )
        )
    return rows


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply FLOP/s of this process's threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    seconds = _timed(lambda: [a @ b for _ in range(repeats)], repeats=3) / repeats
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
        seconds = _timed(lambda: [conv(x) for _ in range(repeats)], repeats=3) / repeats
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


class _NpyFolder:
    """The reference notebooks' dataset: one `np.load` per sample, every epoch."""

    def __init__(self, files: list[tuple[str, int]], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        path, label = self.files[index]
        return self.transform(torch.from_numpy(np.load(path, allow_pickle=False))), label


def reference_throughput(model_name: str, files: list[tuple[str, int]], images: int) -> float:
    """Images/s of the reference pipeline training `model_name` on `images` images."""
    import torch
    from torchvision import transforms

    from models import create_model

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        _NpyFolder(files, transforms.Normalize((0.5,), (0.5,))), batch_size=64, shuffle=True
    )
    model = create_model(model_name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def timed_epochs(
    model_name: str,
    train_set,
    images: int,
    precision: str = "fp32",
    compiled: bool = False,
    model_kwargs: dict | None = None,
) -> tuple[float, float, int]:
    """This project's loop (default config and `model_kwargs`, autocast `precision`,
    `torch.compile` when `compiled`) on `images` images after a 4-batch warm-up: (warm-up
    seconds, images/s, batch)."""
    import torch

    from experiments.settings import TrainConfig
    from experiments.train import make_optimizer, train_one_epoch
    from models import create_model

    cfg = TrainConfig(model=model_name, model_kwargs=dict(model_kwargs or {}))
    prep = cfg.preprocessing().fit(train_set.images[:images])
    x = prep.transform(train_set.images[:images])
    y = train_set.labels[:images]
    with torch.random.fork_rng():  # the same initial weights in every call, global RNG kept
        torch.manual_seed(0)
        model = create_model(model_name, **cfg.model_kwargs)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    step = torch.compile(model) if compiled else model
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    augment = prep.augmenter()
    warm = min(len(y), 4 * cfg.batch_size)
    args = (optimizer, None, loss_fn, cfg.batch_size, augment, generator)
    start = time.perf_counter()
    train_one_epoch(step, x[:warm], y[:warm], *args, precision=precision)
    warm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train_one_epoch(step, x, y, *args, precision=precision)
    return warm_seconds, len(y) / (time.perf_counter() - start), cfg.batch_size


def project_throughput(
    model_name: str, train_set, images: int, precision: str = "fp32"
) -> tuple[float, int]:
    """Images/s of this project's loop (default config, autocast `precision`) on `images`
    images; returns (rate, batch)."""
    _, rate, batch = timed_epochs(model_name, train_set, images, precision)
    return rate, batch


def bench_precision(root: Path, images: int) -> list[str]:
    """Markdown rows: per model, training images/s in fp32 and in bf16 autocast, measured
    alternately twice (best of two each) in this run, and what `precision=auto` picks."""
    import torch

    from data_tools import load_split
    from experiments.inference import training_precision
    from models import MODELS

    train_set = load_split("TRAIN", root, config.cache_dir())
    rows = []
    for name in MODELS:
        rates: dict[str, float] = {"fp32": 0.0, "bf16": 0.0}
        for _ in range(2):
            for precision in rates:
                rate, _ = project_throughput(name, train_set, images, precision)
                rates[precision] = max(rates[precision], rate)
        auto = training_precision("auto", torch.device("cpu"), name)
        ratio = rates["bf16"] / rates["fp32"]
        rows.append(
            f"| {name} | {rates['fp32']:,.0f} | {rates['bf16']:,.0f} | {ratio:.2f}x | {auto} |"
        )
        print(f"  {name:<13} fp32 {rates['fp32']:7.0f} img/s  bf16 {rates['bf16']:7.0f} img/s  "
              f"{ratio:4.2f}x  auto -> {auto}", flush=True)  # fmt: skip
    return rows


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run the block on `count` torch threads, then give the previous count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _alternately(ways: dict, repeats: int) -> tuple[dict, dict]:
    """Call each of `ways` `repeats` times, alternately, the order swapped every repeat (so
    neither way always runs first): (best seconds per way, every result per way)."""
    best, results = dict.fromkeys(ways, math.inf), {key: [] for key in ways}
    for repeat in range(repeats):
        for key in sorted(ways, reverse=repeat % 2 == 1):
            start = time.perf_counter()
            results[key].append(ways[key]())
            best[key] = min(best[key], time.perf_counter() - start)
    return best, results


PREDICT_OLD_BATCH = 1024  # predict_logits' batch before this section chose PREDICT_BATCH


def bench_predict(root: Path, repeats: int = 3) -> tuple[list[str], bool]:
    """Markdown rows: per model and thread count, prediction images/s of `predict_logits` on
    TEST (prepared by the default config, a default model in eval mode, channels-last) at the
    old batch of 1,024 and at `PREDICT_BATCH`, alternately `repeats` times (best of each), and
    whether the two batches gave bit-identical logits. Returns (rows, every pair identical)."""
    import torch

    from data_tools import load_split
    from experiments.inference import PREDICT_BATCH, predict_logits
    from experiments.settings import TrainConfig
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
            with _threads(threads):
                for batch in (PREDICT_OLD_BATCH, PREDICT_BATCH):  # warm-up: each batch's shapes
                    predict_logits(model, x[: 2 * batch], batch)
                ways = {b: functools.partial(predict_logits, model, x, b)
                        for b in (PREDICT_OLD_BATCH, PREDICT_BATCH)}  # fmt: skip
                best, results = _alternately(ways, repeats)
            rates = {batch: len(x) / seconds for batch, seconds in best.items()}
            logits = {batch: outputs[-1] for batch, outputs in results.items()}
            same = torch.equal(logits[PREDICT_OLD_BATCH], logits[PREDICT_BATCH])
            identical &= same
            ratio = rates[PREDICT_BATCH] / rates[PREDICT_OLD_BATCH]
            rows.append(
                f"| {name} | {threads} | {rates[PREDICT_OLD_BATCH]:,.0f} | "
                f"{rates[PREDICT_BATCH]:,.0f} | {ratio:.2f}x | {'yes' if same else 'no'} |"
            )
            print(f"  {name:<13} {threads} thread(s)  {PREDICT_OLD_BATCH}: "
                  f"{rates[PREDICT_OLD_BATCH]:7.0f} img/s  {PREDICT_BATCH}: "
                  f"{rates[PREDICT_BATCH]:7.0f} img/s  {ratio:4.2f}x  identical: {same}",
                  flush=True)  # fmt: skip
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
    best, _ = _alternately(ways, repeats)
    return 1000 * best["onednn"], 1000 * best["matmul"]


def depthwise_layer_times(repeats: int = 5) -> list[str]:
    """Markdown rows: per depthwise layer shape of a default EfficientNet that takes the
    batched-matmul gradient, ms per weight gradient both ways on one thread."""
    from models.layers import SMALL_MAP_MIN_KERNEL

    rows = []
    with _threads(1):
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
            with _threads(threads):
                ways = {fast: functools.partial(epoch_rate, fast, kwargs) for fast in (False, True)}
                _, results = _alternately(ways, repeats)
            rates = {fast: max(values) for fast, values in results.items()}
            ratio = rates[True] / rates[False]
            slowest = min(slowest, ratio)
            label = ", ".join(f"{k} {v}" for k, v in kwargs.items()) or "default"
            rows.append(
                f"| {label} | {threads} | {rates[False]:,.0f} | {rates[True]:,.0f} | {ratio:.2f}x |"
            )
            print(f"  efficientnet {label:<30} {threads} thread(s)  oneDNN {rates[False]:6.0f} "
                  f"img/s  matmul {rates[True]:6.0f} img/s  {ratio:4.2f}x", flush=True)  # fmt: skip
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
    from experiments.inference import training_precision
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
        print(f"  {name:<13} eager {eager:6.0f} img/s  compiled {compiled:6.0f} img/s  compile "
              f"{compile_s:5.1f} s  final {eager_final:.0f} vs {compiled_final:.0f} s", flush=True)  # fmt: skip
    return rows, all(wins)


def bench_training(
    root: Path, images: int
) -> tuple[list[str], dict[str, float], dict[str, tuple[float, float]]]:
    """Markdown rows, the dense kernels' measured FLOP/s, and per model (speed-up, MFU against
    the best of those kernels)."""
    from data_tools import load_split
    from models import MODELS

    train_set = load_split("TRAIN", root, config.cache_dir())
    rng = np.random.default_rng(0)
    listed = list_files(root / "TRAIN", NUM_CLASSES)
    files = [listed[i] for i in rng.permutation(len(listed))[: images * 2]]
    peaks = dense_peaks()
    peak = max(peaks.values())
    rows, results = [], {}
    for name in MODELS:
        reference = reference_throughput(name, files, images)
        ours, batch = project_throughput(name, train_set, images)
        flops = step_flops(name, batch) / batch
        mfu = flops * ours / peak
        results[name] = (ours / reference, mfu)
        rows.append(
            f"| {name} | {reference:,.0f} | {ours:,.0f} | {ours / reference:.2f}x | "
            f"{flops / 1e6:.1f} | {flops * ours / 1e9:.1f} | {mfu:.0%} |"
        )
        print(f"  {name:<13} reference {reference:7.0f} img/s  ours {ours:7.0f} img/s  "
              f"{ours / reference:5.2f}x  MFU {mfu:.0%}", flush=True)  # fmt: skip
    return rows, peaks, results


def bench_logging(root: Path) -> tuple[float, float]:
    """(seconds in MLflow calls, seconds of the whole trial) for one small real trial."""
    import mlflow

    from experiments.runner import load_step_data, train_and_log
    from experiments.settings import TrainConfig
    from experiments.steps import get_step

    spent = [0.0]
    originals = {}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    names = (
        "start_run",
        "end_run",
        "log_params",
        "log_metrics",
        "log_artifacts",
        "set_tag",
        "set_tags",
    )
    for name in names:
        originals[name] = getattr(mlflow, name)
        setattr(mlflow, name, timed(originals[name]))
    try:
        with tempfile.TemporaryDirectory() as store:
            os.environ["MLRUNS_DIR"] = store
            data = load_step_data(get_step("task2-step3"), root)
            cfg = TrainConfig(model="resnet", epochs=3, train_subset=2000, val_subset=1000)
            start = time.perf_counter()
            train_and_log(data, cfg, run_name="bench", log_figures=False)
            total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(mlflow, name, fn)
        os.environ.pop("MLRUNS_DIR", None)
    return spent[0], total


def bench_reproduce() -> float:
    """Wall time of `make reproduce` with the default budget, into a throw-away store and reports."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "MLRUNS_DIR": f"{tmp}/mlruns",
            "REPORTS_DIR": f"{tmp}/reports",
            "CI": "1",
        }
        start = time.perf_counter()
        subprocess.run(["make", "reproduce"], cwd=config.PROJECT_ROOT, env=env, check=True)
        return time.perf_counter() - start


FIDELITY_STUDIES = (("task2-step3", "resnet"), ("task1-step1", "hybrid"))
FIDELITIES = {
    # name: Budget changes; "final" is the reference every other fidelity is ranked against
    "current (4,000-image subset, 6,000 images)": {},
    "the previous default (12,000 images)": {"trial_images": 12_000},
    "4x images (24,000) on the same subset": {"trial_images": 24_000},
    "3x larger subset (12,000 images, 24,000 seen)": {
        "train_subset": 12_000,
        "trial_images": 24_000,
    },
}

# Task 2 levers (issue: champions): one hand-set recipe, each lever added to it, trained on
# task2-step3's data (TEST's white half minus SELECT2), judged on SELECT2; TEST2 measured after.
LEVER_STEP = "task2-step3"
LEVER_RECIPE = dict(RECIPE)  # the task2-recipe step's settings (experiments/steps.py)
LEVER_MODELS = {model: dict(knobs) for model, knobs in RECIPE_MODELS}
RECIPE_ROW = "recipe (affine)"
# the rounds of levers, each measured against the recipe in one run (`LEVER_ROUND`)
LEVER_ROUNDS: dict[str, tuple[str, dict[str, dict]]] = {
    "1": (
        "EMA and elastic augmentation",
        {
            RECIPE_ROW: {},
            "+ EMA 0.99": {"ema_decay": 0.99},
            "affine + elastic": {"augmentation": "affine_elastic"},
            "affine + elastic + EMA 0.99": {"augmentation": "affine_elastic", "ema_decay": 0.99},
        },
    ),
    "2": (
        "mixup, cutmix, SWA, wider models",
        {
            RECIPE_ROW: {},
            "+ mixup 0.2": {"mixup_alpha": 0.2},
            "+ cutmix 1.0": {"cutmix_alpha": 1.0},
            "+ SWA from 75 %": {"swa_start": 0.75},
            "width 32": {"width": 32},
        },
    ),
}
LEVERS = {name: changes for _, levers in LEVER_ROUNDS.values() for name, changes in levers.items()}


def bench_levers(seeds: int = 2, levers: dict[str, dict] | None = None):
    """Per (model, lever) of `levers` (default: every round's): SELECT2 accuracy (the selection split, read to choose) and TEST2
    accuracy (measured only), each the mean over `seeds` seeds; then per lever the softmax
    average of all its runs (every model and seed) on both sets; no MLflow."""
    import pandas as pd
    import torch

    from experiments.inference import ensemble_accuracy, probabilities
    from experiments.runner import load_step_data
    from experiments.settings import resolve
    from experiments.steps import get_step
    from experiments.train import fit

    levers = LEVERS if levers is None else levers
    data = load_step_data(get_step(LEVER_STEP))
    test2 = data.eval_sets["TEST2"]
    rows = []
    members: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {lever: [] for lever in levers}
    for model, knobs in LEVER_MODELS.items():
        for lever, changes in levers.items():
            select2, measured, seconds = [], [], 0.0
            for seed in range(seeds):
                cfg = resolve(model, searched={**LEVER_RECIPE, **knobs, **changes, "seed": seed})
                start = time.perf_counter()
                result = fit(cfg, data.train_set, label=f"lever {model} {lever} {seed}",
                             val_set=data.val_set)  # fmt: skip
                seconds += time.perf_counter() - start
                select2.append(result.best_val_acc)
                on_test2 = probabilities(result, test2.images)  # predicted once: run, ensemble
                measured.append(ensemble_accuracy([on_test2], test2.labels))
                members[lever].append((probabilities(result, data.val_set.images), on_test2))
            rows.append(
                {
                    "model": model,
                    "lever": lever,
                    "SELECT2 (mean)": sum(select2) / seeds,
                    "TEST2 (mean, measured after)": sum(measured) / seeds,
                    "SELECT2 per seed": " / ".join(f"{v:.4f}" for v in select2),
                    "TEST2 per seed": " / ".join(f"{v:.4f}" for v in measured),
                    "wall seconds": seconds,
                }
            )
            print(f"  {model} {lever}: SELECT2 {rows[-1]['SELECT2 (mean)']:.4f} "
                  f"TEST2 {rows[-1]['TEST2 (mean, measured after)']:.4f}", flush=True)  # fmt: skip
    for lever, runs in members.items():  # the fixed ensemble recipe: all of a lever's runs
        select2 = ensemble_accuracy([p for p, _ in runs], data.val_set.labels)
        measured = ensemble_accuracy([p for _, p in runs], test2.labels)
        rows.append(
            {
                "model": ENSEMBLE_ROW,
                "lever": lever,
                "SELECT2 (mean)": select2,
                "TEST2 (mean, measured after)": measured,
                "SELECT2 per seed": f"{len(runs)} members",
                "TEST2 per seed": "",
                "wall seconds": 0.0,
            }
        )
    frame = pd.DataFrame(rows)
    frame.attrs["select2_images"] = len(data.val_set)
    return frame


# a lever is kept when its SELECT2 mean beats the recipe's by at least this many images
LEVER_MARGIN_IMAGES = 2
ENSEMBLE_ROW = "ensemble (every model and seed)"


def kept_levers(frame, select2_images: int) -> dict[str, str | None]:
    """Per model, the lever the rule keeps (None: the recipe alone), read from SELECT2 only:
    the best SELECT2 mean, if it beats the recipe's by at least `LEVER_MARGIN_IMAGES` images
    (fixed before scoring; one image of 600 is 0.0017, below what SELECT2 can tell apart)."""
    recipe = RECIPE_ROW
    kept: dict[str, str | None] = {}
    for model, rows in frame.groupby("model", sort=False):
        scores = rows.set_index("lever")["SELECT2 (mean)"]
        best = scores.drop(recipe).idxmax()
        margin = (scores[best] - scores[recipe]) * select2_images
        kept[model] = best if margin >= LEVER_MARGIN_IMAGES - 1e-6 else None
    return kept


def write_levers(out: str | None = None) -> Path:
    """The `LEVER_ROUND` round (default the newest) of `LEVER_ROUNDS`, `LEVER_SEEDS` seeds
    (default 2), as its own section of reports/levers.md; the other rounds' sections stay."""
    seeds = int(os.environ.get("LEVER_SEEDS", "2"))
    number = os.environ.get("LEVER_ROUND", list(LEVER_ROUNDS)[-1])
    if number not in LEVER_ROUNDS:
        raise ValueError(f"LEVER_ROUND={number}: expected one of {', '.join(LEVER_ROUNDS)}")
    title, levers = LEVER_ROUNDS[number]
    frame = bench_levers(seeds, levers)
    select2 = frame.attrs["select2_images"]
    kept = kept_levers(frame, select2)
    head = "\n".join(
        [
            "# Task 2 levers: each added to one hand-set recipe, judged on SELECT2",
            "",
            "Written by `python -m experiments bench --only levers` (`make levers LEVER_ROUND=N`).",
            f"Data: {LEVER_STEP} (TEST's white half minus SELECT2), validated on SELECT2 "
            f"({select2} images); the kept epoch is the best SELECT2 loss. TEST2 is measured "
            "after and chooses nothing.",
            "Each round reruns the recipe (the task2-recipe step's settings when it ran) "
            "beside its levers.",
            "",
            f"Rule, fixed before scoring: a lever is kept when its SELECT2 mean beats the "
            f"recipe's by at least {LEVER_MARGIN_IMAGES} images.",
            "",
        ]
    )
    section = "\n".join(
        [
            f"## Round {number}: {title}",
            "",
            f"Machine: {_machine()}. Recipe: {LEVER_RECIPE}; models: {LEVER_MODELS}; "
            f"{seeds} seeds each.",
            "",
            frame.to_markdown(index=False, floatfmt=".4f"),
            "",
            "Kept: "
            + "; ".join(
                f"{model}: {lever or 'none (the recipe alone)'}" for model, lever in kept.items()
            ),
            "",
            "",
        ]
    )
    folder = config.reports_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "levers.md"
    old = _sections(path.read_text())[1].values() if path.exists() else []
    rounds = {_round_number(text): text for text in old if _round_number(text) is not None}
    rounds[int(number)] = section  # this round replaces its own section, whatever its title
    path.write_text(head + "\n" + "".join(rounds[n] for n in sorted(rounds)))
    print(f"wrote {path}")
    return path


def _round_number(section: str) -> int | None:
    """N of a levers.md section headed `## Round N: ...` (None: another section)."""
    found = re.match(r"## Round (\d+)\b", section)
    return int(found.group(1)) if found else None


def bench_fidelity(configs: int = 6, seed: int = 0):
    """Rank correlation between each trial fidelity's validation accuracy and the same settings'
    validation accuracy at the final budget, with the wall seconds each fidelity costs.

    For each study: the defaults plus `configs` settings drawn at random from the search space;
    each trained at every fidelity of `FIDELITIES` and at the final budget (no MLflow).
    """
    import optuna
    import pandas as pd
    from scipy.stats import spearmanr

    from experiments.runner import load_step_data
    from experiments.settings import resolve
    from experiments.space import Budget, suggest
    from experiments.steps import get_step
    from experiments.train import fit

    rows = []
    for step_name, model in FIDELITY_STUDIES:
        data = load_step_data(get_step(step_name))
        sampler = optuna.samplers.RandomSampler(seed=seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        candidates = [{}]
        for _ in range(configs):
            candidates.append(suggest(study.ask(), model))
        scores: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for number, params in enumerate(candidates):
            plans = {
                name: Budget(**changes).trial_role(params, data.train_images, number)
                for name, changes in FIDELITIES.items()
            }
            plans["final budget (reference)"] = Budget().final_role(params, data.train_images)
            for name, role in plans.items():
                cfg = resolve(model, searched=params, role=role)
                start = time.perf_counter()
                result = fit(
                    cfg,
                    data.train_set,
                    label=f"fidelity {step_name}/{model} {number}",
                    val_set=data.val_set,
                )
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                scores.setdefault(name, []).append(result.best_val_acc)
        reference = scores["final budget (reference)"]
        for name in scores:
            rho = spearmanr(scores[name], reference).statistic if name in FIDELITIES else 1.0
            rows.append(
                {
                    "study": f"{step_name}/{model}",
                    "fidelity": name,
                    "settings": len(candidates),
                    "wall seconds": seconds[name],
                    "Spearman rho vs final": rho,
                    "rho per minute": rho / (seconds[name] / 60) if name in FIDELITIES else None,
                }
            )
    return pd.DataFrame(rows)


def write_fidelity(out: str | None = None) -> Path:
    """reports/fidelity.md from `bench_fidelity`, and the same section in bench.md.

    `FIDELITY_CONFIGS` (default 6) sets how many random settings join the defaults.
    """
    configs = int(os.environ.get("FIDELITY_CONFIGS", "6"))
    frame = bench_fidelity(configs)
    text = "\n".join(
        [
            "## Trial fidelity: does a trial's score predict its final?",
            "",
            f"Machine: {_machine()}. For each study, the defaults and {configs} random settings of the",
            "search space, each trained at every trial fidelity and at the final budget (validation",
            "accuracy on the same split; no evaluation set is read). Spearman rho ranks each",
            "fidelity's scores against the final budget's.",
            "",
            frame.to_markdown(index=False, floatfmt=".3f", missingval=""),
            "",
        ]
    )
    folder = config.reports_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fidelity.md").write_text(text)
    bench = folder / "bench.md"
    old = bench.read_text() if bench.exists() else "# Benchmarks\n"
    head, marker, rest = old.partition("## Trial fidelity")
    tail = rest[rest.find("\n## ") :] if marker and "\n## " in rest else ""
    bench.write_text(head.rstrip("\n") + "\n\n" + text + tail.lstrip("\n"))
    print(text)
    return folder / "fidelity.md"


def _cpu_name() -> str:
    """The CPU's model name and its bf16 support, read at run time (Linux; else the platform)."""
    from experiments.inference import cpu_has_bf16

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({'with' if cpu_has_bf16() else 'without'} native bf16)"


def _machine() -> str:
    return (
        f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


DEFAULT_SECTIONS = ("data", "train", "precision", "predict", "depthwise", "logging")
DEPTHWISE_SECTION = "## Depthwise weight gradient (EfficientNet training, CPU)"
DEPTHWISE_TARGET = "depthwise weight gradient: faster, same gradient (rel. 1e-5)"
COMPILE_SECTION = "## torch.compile vs eager (TRAIN images, CPU)"
PREDICT_SECTION = "## Prediction batch (TEST images, CPU)"
PREDICT_TARGET = "prediction batch: logits identical to batch 1,024"
REPRODUCE_SECTION = "## `make reproduce` at the default budget"
TRIED_SECTION = "## What was tried"
# measured only by `--only compile` / BENCH_FULL=1: a default run keeps them and their targets
KEPT_SECTIONS = (COMPILE_SECTION, REPRODUCE_SECTION)
COMPILE_TARGET = "torch.compile kept only if it wins"
REPRODUCE_TARGET = "make reproduce <= 30 min"
KEPT_TARGETS = (COMPILE_TARGET, REPRODUCE_TARGET)


def run_bench(out: str | None = None, sections: list[str] | None = None) -> Path:
    sections = sections or list(DEFAULT_SECTIONS)
    if sections == ["fidelity"]:
        return write_fidelity(out)
    if sections == ["levers"]:
        return write_levers(out)
    targets: list[tuple[str, str, bool]] = []
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python -m experiments bench`; its last run: {_machine()}. Each section "
        "names the machine it was measured on (the CPU varies between machines of this kind: "
        "with or without AVX-512 and native bf16); a run replaces only the sections it measures.",
        "",
    ]
    # each section names its machine: sections measured by another run stay in the file
    measured_on = f"Measured on {_machine()}, {time.strftime('%Y-%m-%d')}."
    if "data" in sections:
        root = config.data_dir()
        print(f"data: reading {root} three ways ...", flush=True)
        rows = bench_data(root)
        lines += [
            "## Data loading (TRAIN + TEST + TEST2)",
            "",
            measured_on,
            "",
            "Targets: cold read <= 4 s, warm load <= 0.3 s.",
            "",
            "| measurement | seconds | vs baseline |",
            "|---|---|---|",
        ]
        for name, seconds, note in rows:
            lines.append(f"| {name} | {seconds:.3f} | {note} |")
            print(f"  {name:<55} {seconds:7.3f} s  {note}")
        lines.append("")
        cold = max(seconds for name, seconds, _ in rows if name.startswith("cold read"))
        warm = next(seconds for name, seconds, _ in rows if name.startswith("warm load"))
        targets.append(("cold read <= 4 s (worst case measured)", f"{cold:.2f} s", cold <= 4))
        targets.append(("warm load <= 0.3 s", f"{warm:.3f} s", warm <= 0.3))
    if "train" in sections:
        images = int(os.environ.get("BENCH_IMAGES", "2560"))
        print(f"training throughput: {images} images per model and pipeline ...", flush=True)
        rows, peaks, results = bench_training(config.data_dir(), images)
        best = max(peaks, key=peaks.get)
        measured = "; ".join(f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in peaks.items())
        vgg_speedup = results["vgg"][0]
        targets.append(
            (
                "VGG training >= 2.5x the reference pipeline",
                f"{vgg_speedup:.2f}x",
                vgg_speedup >= 2.5,
            )
        )
        for name, (_, mfu) in results.items():
            targets.append((f"{name} MFU >= 50 %", f"{mfu:.0%}", mfu >= 0.5))
        lines += [
            "## Training throughput and model-FLOP utilisation (TRAIN images, CPU)",
            "",
            measured_on,
            "",
            f"Dense kernels measured in this run: {measured}. MFU is against the best of them "
            f"({best}). Reference pipeline: "
            "per-sample `np.load` Dataset, DataLoader batch 64, NCHW. This project: in-memory "
            "tensors, default config (affine augmentation on), channels-last, batch 128. "
            f"{images} images each. Targets: MFU >= 50 %, VGG >= 2.5x the reference.",
            "",
            "| model | reference img/s | ours img/s | speed-up | MFLOP/img (3 x fwd) | GFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    if "precision" in sections:
        import torch

        images = int(os.environ.get("BENCH_IMAGES", "2560"))
        print(f"training precision: fp32 vs bf16 autocast, {images} images ...", flush=True)
        rows = bench_precision(config.data_dir(), images)
        lines += [
            "## Training precision: fp32 vs bf16 autocast (TRAIN images, CPU)",
            "",
            measured_on,
            "",
            f"Default config, channels-last, batch 128, {torch.get_num_threads()} thread(s), {images} "
            "images, each precision measured twice alternately (best of two). `auto` trains "
            "in bf16 only where the CPU has it natively and the model does not declare it "
            "slower (`CPU_BF16 = False`).",
            "",
            "| model | fp32 img/s | bf16 img/s | bf16 / fp32 | `auto` here |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    if "predict" in sections:
        from experiments.inference import PREDICT_BATCH

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
    if "depthwise" in sections:
        from models.layers import SMALL_MAP_MIN_KERNEL, SMALL_MAP_PIXELS

        images = int(os.environ.get("BENCH_IMAGES", "2560"))
        print(f"depthwise weight gradient: oneDNN vs batched matmul, {images} images ...",
              flush=True)  # fmt: skip
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
    if "compile" in sections:
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
            "over eager, with inductor's on-disk cache empty (a warm cache, left by an earlier "
            "compile of the same graph, cuts it to about a second). Every run builds a new model (trials differ in width and depth), so "
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
    if "logging" in sections:
        print("MLflow logging share of a small real trial ...", flush=True)
        logging_seconds, total = bench_logging(config.data_dir())
        share = logging_seconds / total
        targets.append(("MLflow logging <= 5 % of a trial", f"{share:.1%}", share <= 0.05))
        print(f"  MLflow calls {logging_seconds:.2f} s of {total:.2f} s ({share:.1%})")
        lines += [
            "## MLflow logging share of a trial",
            "",
            measured_on,
            "",
            "A resnet trial on TRAIN3 (3 epochs, 2,000 training images, 1,000 validation images), "
            "logged to a fresh SQLite store; time inside MLflow calls (runs, params, per-epoch "
            "metric batches, tags, the checkpoint artifact). Target <= 5 %.",
            "",
            f"| MLflow seconds | trial seconds | share |\n|---|---|---|\n| {logging_seconds:.2f} | {total:.2f} | {share:.1%} |",
            "",
        ]
    path = config.reports_dir(out) / "bench.md"
    old = path.read_text() if path.exists() else ""
    if os.environ.get("BENCH_FULL") == "1":
        print("make reproduce at the default budget, into a temporary store ...", flush=True)
        seconds = bench_reproduce()
        lines += [
            REPRODUCE_SECTION,
            "",
            f"{measured_on} Wall time into a fresh temporary store: {seconds / 60:.1f} min "
            "(target <= 30 min).",
            "",
        ]
        targets.append((REPRODUCE_TARGET, f"{seconds / 60:.1f} min", seconds <= 1800))
    elif REPRODUCE_SECTION not in _sections(old)[1]:  # a timed one is kept across runs
        lines += [
            REPRODUCE_SECTION,
            "",
            "Not timed yet (`BENCH_FULL=1 make bench` times it into a throw-away store);",
            "the README's budget line gives the last measured wall time.",
            "",
        ]
    import torch

    gpu = config.reports_dir(out) / "gpu.md"
    if gpu.exists():  # measured on a lent GPU (README "On a GPU"), kept across runs
        lines += [gpu.read_text().rstrip("\n"), ""]
    elif not torch.cuda.is_available():
        lines += [
            "## GPU",
            "",
            "No CUDA device in this run: the GPU figures come from a run on one.",
            "",
        ]
    lines += [
        TRIED_SECTION,
        "",
        "- Kept: in-memory tensors and batched kornia augmentation (no per-sample Python on the hot",
        "  path); channels-last models (1.3-1.6x faster convolutions on the AVX512_BF16 EPYC, measured once by hand",
        "  with the default models); one host sync per epoch instead of per batch.",
        "- Kept: bf16 autocast for training where the CPU has AVX512_BF16/AMX (`precision=auto`):",
        "  measured on an AMD EPYC with AVX512_BF16, VGG on TRAIN 34 -> 22 s/epoch and ResNet on TRAIN3",
        "  1.2 -> 0.93 s/epoch, validation accuracy unchanged (0.9892 / 0.9892, 0.9517 / 0.9533).",
        "- Kept: EfficientNet stays fp32 under `auto` (`CPU_BF16 = False`): bf16 autocast trains it",
        "  about 1.8x slower on the AVX512_BF16 EPYC (depthwise convolutions); on a CPU without",
        "  native bf16, autocast is 7-14x slower for every model and `auto` trains in fp32.",
        "- Kept: two 1-thread processes instead of one 2-thread process (~10 % more images/s in",
        "  total for vgg and resnet, measured once by hand): `make reproduce` runs one make job per",
        "  chain (a model's studies of one task), two at a time (two fixed lanes: 35 min 55 s on a",
        "  fresh clone; one job per study, TRAIN2's finals at 1 epoch and a lighter report: 29 min",
        "  56 s and 30 min 38 s; README 'Results' has the chains' run).",
        "- Kept: prediction in batches of 256 instead of 1,024 (`PREDICT_BATCH`): bit-identical",
        "  logits, 0.9-2.1x the images/s per model and thread count in three runs on the AVX2-only EPYC",
        "  (most 1.1-1.9x; this CPU's speeds vary run to run), section 'Prediction batch'.",
        "- Kept: EfficientNet's 5x5 depthwise weight gradients on 4x4 maps as one batched",
        "  matmul per layer (`models.layers.DepthwiseConv2d`): a torch profile of one EfficientNet",
        "  training epoch on the AVX2-only EPYC put 38 % of it in oneDNN's weight gradient of those",
        "  two layers (27-43 ms a call, against 1.4-2.8 ms as a matmul: per-layer table); the 3x3",
        "  layers on the same maps keep oneDNN, faster for them. 1.3-1.9x the training images/s over",
        "  four runs, gradients equal to 3e-7 (section 'Depthwise weight gradient'). The other",
        "  models have no depthwise convolution; their profiles showed no such outlier (dense 3x3",
        "  convolutions and batch norm dominate).",
        "- Not kept: `torch.compile` (inductor, default mode) on CPU. On the AVX512_BF16 EPYC",
        "  0.76-0.99x eager's images/s in two runs, before a 9-45 s cold compile per model (0.79-1.05x",
        "  with a warm on-disk cache, about 1 s); on the AVX2-only EPYC, in fp32, 0.72-1.02x before",
        "  15-83 s, and after the depthwise change above 0.76-1.30x before 20-97 s: ResNet and",
        "  EfficientNet ran faster compiled, but their compile is paid back only after 143,000 and",
        "  330,000 images, more than a final trains (`bench --only compile`, its section).",
        "- Not kept, for the Task 1 black half (throw-away scripts on the AVX2-only EPYC, the",
        "  task1-step1 defaults at the final budget, 3 epochs): test-time augmentation over the",
        "  one-pixel shifts raised the black half by 0.001-0.008 (VGG 0.960 -> 0.963, ResNet 0.901",
        "  -> 0.902, EfficientNet 0.927 -> 0.935, hybrid 0.892 -> 0.898) and TRAIN validation with",
        "  it, for five forward passes over every answer's validation and evaluation sets (an",
        "  estimated 4-7 min of a reproduce); EMA at 0.995 (with the warm-up) left EfficientNet at",
        "  0.969 / 0.926 against 0.968 / 0.927 plain, as a cosine schedule ends at a rate of 0.",
        "- Where a study's time goes (py-spy, task2-step3/hybrid, one thread, 362 s): 82 %",
        "  `train_one_epoch`, 5 % per-epoch validation, 5 % imports, 4 % scoring, figures and model",
        "  logging; no overhead is worth more than a minute or two of a reproduce.",
        "- Not tried yet: a cheaper default VGG for the search.",
        "",
    ]
    fidelity = config.reports_dir(out) / "fidelity.md"
    if fidelity.exists():  # measured by `bench --only fidelity` (slow), kept across runs
        lines += [fidelity.read_text(), ""]
    rows = []
    print("targets:")
    for target, measured, met in targets:
        verdict = "met" if met else "GAP"
        rows.append(f"| {target} | {measured} | {verdict} |")
        print(f"  {verdict:<4} {target:<45} {measured}")
    text = "\n".join(lines)
    if old:  # a run replaces what it measured (a default run: all but KEPT_SECTIONS)
        text, rows = _merge(old, text, rows, full=set(sections) == set(DEFAULT_SECTIONS))
    text += "\n".join(["## Targets", "", "| target | measured | |", "|---|---|---|", *rows, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """A bench.md's title block and its `## ` sections by heading line, in order."""
    head, *parts = re.split(r"(?m)^(?=## )", text)
    return head, {part.splitlines()[0]: part for part in parts}


def _target_name(row: str) -> str:
    return row.split("|")[1].strip()


def _merge(old: str, new: str, rows: list[str], full: bool) -> tuple[str, list[str]]:
    """The file a run writes over `old`, without its Targets section, and the target rows.

    A partial run (`--only`): the old file, the run's sections in their place (new ones
    appended), the old targets it did not measure kept. A default run (`full`): its own
    sections in its order, with only the old sections another command measures
    (`KEPT_SECTIONS`) put back before "What was tried", and only their targets.
    """
    _, old_parts = _sections(old)
    head, new_parts = _sections(new)
    old_rows = old_parts.pop("## Targets", "").splitlines()[4:]
    if full:
        kept = {k: v for k, v in old_parts.items() if k in KEPT_SECTIONS and k not in new_parts}
        merged: dict[str, str] = {}
        for heading, part in new_parts.items():
            if heading == TRIED_SECTION:
                merged.update(kept)
            merged[heading] = part
        merged.update(kept)  # no-op when they went in before "What was tried"
    else:
        merged = {**{k: new_parts.get(k, v) for k, v in old_parts.items()}, **new_parts}
    measured = {_target_name(row) for row in rows}
    kept_rows = [
        r
        for r in old_rows
        if r.startswith("| ")
        and _target_name(r) not in measured
        and (not full or _target_name(r) in KEPT_TARGETS)
    ]
    return head + "".join(merged.values()), rows + kept_rows
