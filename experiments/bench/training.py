"""Training throughput against the reference pipeline, model-FLOP utilisation, fp32 vs bf16."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from data_tools.datasets import NUM_CLASSES
from data_tools.reader import list_files
from experiments.bench.timing import dense_peaks, step_flops
from experiments.core import config
from experiments.core.reports import Target


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

    from experiments.core.settings import TrainConfig
    from experiments.training.train import Stepper, make_optimizer, train_one_epoch
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
    stepper = Stepper(
        step, optimizer, loss_fn, cfg.batch_size, generator, augment=augment, precision=precision
    )
    start = time.perf_counter()
    train_one_epoch(stepper, x[:warm], y[:warm])
    warm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train_one_epoch(stepper, x, y)
    return warm_seconds, len(y) / (time.perf_counter() - start), cfg.batch_size


def project_throughput(
    model_name: str, train_set, images: int, precision: str = "fp32"
) -> tuple[float, int]:
    """Images/s of this project's loop (default config, autocast `precision`) on `images`
    images; returns (rate, batch)."""
    _, rate, batch = timed_epochs(model_name, train_set, images, precision)
    return rate, batch


def bench_training(
    root: Path, images: int
) -> tuple[list[str], dict[str, float], dict[str, tuple[float, float]]]:
    """Markdown rows, the dense kernels' measured FLOP/s (per precision) and per model
    (speed-up, MFU): each model trains in the precision `auto` picks here and is measured
    against the best dense kernel in that precision, measured in the same run."""
    import torch

    from data_tools import load_split
    from experiments.training.inference import training_precision
    from models import MODELS

    train_set = load_split("TRAIN", root, config.cache_dir())
    rng = np.random.default_rng(0)
    listed = list_files(root / "TRAIN", NUM_CLASSES)
    files = [listed[i] for i in rng.permutation(len(listed))[: images * 2]]
    precisions = {name: training_precision("auto", torch.device("cpu"), name) for name in MODELS}
    peaks = {
        k: v for dtype in sorted(set(precisions.values())) for k, v in dense_peaks(dtype).items()
    }
    rows, results = [], {}
    for name in MODELS:
        precision = precisions[name]
        peak = max(v for k, v in peaks.items() if k.startswith(precision))
        reference = reference_throughput(name, files, images)
        ours, batch = project_throughput(name, train_set, images, precision)
        flops = step_flops(name, batch) / batch
        mfu = flops * ours / peak
        results[name] = (ours / reference, mfu)
        rows.append(
            f"| {name} | {precision} | {reference:,.0f} | {ours:,.0f} | {ours / reference:.2f}x | "
            f"{flops / 1e6:.1f} | {flops * ours / 1e9:.1f} | {mfu:.0%} |"
        )
        print(
            f"  {name:<13} {precision} reference {reference:7.0f} img/s  ours {ours:7.0f} "
            f"img/s  {ours / reference:5.2f}x  MFU {mfu:.0%}",
            flush=True,
        )
    return rows, peaks, results


def bench_precision(root: Path, images: int) -> list[str]:
    """Markdown rows: per model, training images/s in fp32 and in bf16 autocast, measured
    alternately twice (best of two each) in this run, and what `precision=auto` picks."""
    import torch

    from data_tools import load_split
    from experiments.training.inference import training_precision
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
        print(
            f"  {name:<13} fp32 {rates['fp32']:7.0f} img/s  bf16 {rates['bf16']:7.0f} img/s  "
            f"{ratio:4.2f}x  auto -> {auto}",
            flush=True,
        )
    return rows


def training_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """Training throughput and MFU: the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
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
    floor = MFU_TARGETS[_cpu_class()]
    for name in ("vgg", "resnet"):
        mfu = results[name][1]
        targets.append((f"{name} MFU >= {floor:.0%} ({_cpu_class()})", f"{mfu:.0%}", mfu >= floor))
    lines += [
        "## Training throughput and model-FLOP utilisation (TRAIN images, CPU)",
        "",
        measured_on,
        "",
        f"Dense kernels measured in this run: {measured}. Each model trains in the precision "
        "`auto` picks on this CPU; its MFU is against the best kernel in that precision "
        f"({best} is the best overall). Reference pipeline: "
        "per-sample `np.load` Dataset, DataLoader batch 64, NCHW, fp32. This project: in-memory "
        "tensors, default config (affine augmentation on), channels-last, batch 128. "
        f"{images} images each. Targets: VGG and ResNet MFU >= 40 % on a CPU with native bf16, "
        ">= 60 % on one without; VGG >= 2.5x the reference.",
        "",
        "| model | precision | reference img/s | ours img/s | speed-up | MFLOP/img (3 x fwd) "
        "| GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return lines, targets


MFU_TARGETS = {"native bf16": 0.40, "fp32 only": 0.60}  # VGG and ResNet, per CPU class


def _cpu_class() -> str:
    from experiments.core.machine import cpu_has_bf16

    return "native bf16" if cpu_has_bf16() else "fp32 only"


def precision_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """Training precision, fp32 vs bf16 autocast: the section's lines."""
    lines: list[str] = []
    targets: list[Target] = []
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
    return lines, targets
