"""Benchmark commands: `bench` (this CPU, side by side) and `gpu-bench`."""

from __future__ import annotations

import argparse


def _bench(args: argparse.Namespace) -> None:
    from experiments.bench.run import run_bench

    run_bench(args.out, sections=args.only)


def _gpu_bench(args: argparse.Namespace) -> None:
    from experiments.bench.gpu import run_gpu_bench

    run_gpu_bench(args.out, tiny=args.tiny, reproduce_timeout=args.reproduce_timeout)


def _add_bench(commands) -> None:
    from experiments.bench.run import SECTIONS

    bench = commands.add_parser(
        "bench", help="speed measured side by side in one run, into reports/bench.md"
    )
    bench.add_argument("--out", help="reports folder (default: reports/)")
    bench.add_argument(
        "--only",
        action="append",
        choices=list(SECTIONS),
        help="repeatable: run only these sections (predict: prediction batch 1,024 vs the "
        "default, logits compared; depthwise: EfficientNet's depthwise weight gradient, oneDNN "
        "vs batched matmul; compile: torch.compile vs eager, compile time included; study: one "
        "whole study by a baseline commit and by this tree, utilisation side by side, "
        "BENCH_BASELINE=ref)",
    )
    bench.set_defaults(func=_bench)


def _add_gpu_bench(commands) -> None:
    gpu = commands.add_parser(
        "gpu-bench", help="training images/s per model, make reproduce PROFILE=gpu, GPU use"
    )
    gpu.add_argument("--out", help="reports folder (default: reports/); appends to gpu.md")
    gpu.add_argument(
        "--tiny", action="store_true", help="a few images and `make -n reproduce`, for a CPU"
    )
    gpu.add_argument(
        "--reproduce-timeout",
        type=float,
        default=300.0,
        help="stop make reproduce after S seconds (default 300)",
    )
    gpu.set_defaults(func=_gpu_bench)


def add_commands(commands) -> None:
    _add_bench(commands)
    _add_gpu_bench(commands)
