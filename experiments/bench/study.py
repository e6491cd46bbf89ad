"""Whole-study utilisation, A/B: one study run by a baseline commit and by this tree, in turn.

Utilisation = the study's model FLOPs / (its wall time x the best dense kernel in the precision
the model trains in, measured in the same run). The wall time is the whole `search` process
(imports, data, trials, final, baseline, scoring, logging); the FLOPs are counted the same way
for both versions, from the runs each one logged (`study_flops_from_store`), so a version that
trains more images is not mistaken for a faster one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from experiments.core import config
from experiments.core.reports import Target

STUDY_SECTION = "## Whole-study utilisation, A/B"
# the last commit before the engine work: kornia's affine augmentation, one process per study,
# every report and promote re-predicting every candidate
BASELINE_REF = "9aa5cf4"
STUDY_STEP, STUDY_MODEL = "task2-step3", "vgg"
UTILISATION_TARGET = 2.0  # this tree's whole-study utilisation over the baseline's
STUDY_TARGET = f"whole-study utilisation >= {UTILISATION_TARGET:.0f}x the baseline commit's"


def study_flops_from_store(tracking_uri: str) -> tuple[float, int]:
    """(model FLOPs, runs counted) of every training run in a store: 3 x forward FLOPs for every
    training image of every epoch run, plus a forward for every validation image every epoch.
    Read from params and metrics both versions log (`model`, the model's knobs,
    `split.train_images`, `split.val_images`, `epochs_run`)."""
    from experiments.core.settings import coerce
    from experiments.tracking.results import every_run_data
    from experiments.training.inference import forward_flops
    from models import create_model, hyperparameters

    per_image: dict[tuple, float] = {}
    total, counted = 0.0, 0
    for params, metrics in every_run_data(tracking_uri):
        needed = ("model", "split.train_images", "split.val_images")
        if not all(k in params for k in needed) or "epochs_run" not in metrics:
            continue
        model = params["model"]
        knobs = coerce(model, {k: params[k] for k in hyperparameters(model) if k in params})
        key = (model, tuple(sorted(knobs.items())))
        if key not in per_image:
            per_image[key] = forward_flops(create_model(model, **knobs))
        images = 3 * int(params["split.train_images"]) + int(params["split.val_images"])
        total += per_image[key] * images * metrics["epochs_run"]
        counted += 1
    return total, counted


@contextlib.contextmanager
def checkout(ref: str | None, into: Path) -> Iterator[Path]:
    """This tree (`ref` None) or a detached git worktree of `ref`, removed afterwards."""
    if ref is None:
        yield config.PROJECT_ROOT
        return
    if shutil.which("git") is None:
        raise SystemExit("bench study: git is not installed; it checks out the baseline commit")
    made = subprocess.run(
        ["git", "worktree", "add", "--detach", str(into), ref],
        cwd=config.PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        reason = (made.stderr.strip().splitlines() or ["git worktree add failed"])[-1]
        raise SystemExit(f"bench study: cannot check out baseline {ref!r}: {reason}")
    try:
        yield into
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(into)],
            cwd=config.PROJECT_ROOT,
            capture_output=True,
        )


def run_study(root: Path, store: Path, threads: int, extra: list[str]) -> float:
    """Wall seconds of `python -m experiments search` for the study, run from `root` (its own
    code) into `store`; the dataset cache is filled first, untimed."""
    env = {
        **os.environ,
        "MLRUNS_DIR": str(store / "mlruns"),
        "REPORTS_DIR": str(store / "reports"),
        "CACHE_DIR": str(store / "cache"),
        "DATA_DIR": str(config.data_dir()),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(root),
    }
    subprocess.run(
        [sys.executable, "-m", "data_tools", "prepare"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    command = [
        sys.executable,
        "-m",
        "experiments",
        "search",
        "--step",
        STUDY_STEP,
        "--model",
        STUDY_MODEL,
        "--seed",
        "0",
        *extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench study: the study failed in {root}: {last}")
    return seconds


def bench_study(baseline: str, extra: list[str]) -> dict[str, dict[str, float]]:
    """Run the study by the baseline and by this tree (baseline first), each into its own
    throw-away store: wall seconds, FLOPs and runs counted per version."""
    import torch

    threads = torch.get_num_threads()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, ref in ((f"A: {baseline}", baseline), ("B: this tree", None)):
            store = Path(tmp) / ("a" if ref else "b")
            print(f"  {label}: {STUDY_STEP}/{STUDY_MODEL} on {threads} thread(s) ...", flush=True)
            with checkout(ref, Path(tmp) / "baseline") as root:
                seconds = run_study(root, store, threads, extra)
            db = store / "mlruns" / "mlflow.db"
            flops, runs = study_flops_from_store(f"sqlite:///{db.resolve()}")
            results[label] = {"seconds": seconds, "flops": flops, "runs": runs}
            print(
                f"  {label}: {seconds:.0f} s, {flops / 1e12:.2f} TFLOP in {runs} runs", flush=True
            )
    return results


def study_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """The section's lines and its target (BENCH_BASELINE= another ref; BENCH_STUDY_ARGS= flags
    for both `search` commands, a smaller budget say)."""
    import torch

    from experiments.bench.timing import dense_peaks
    from experiments.training.inference import training_precision

    baseline = os.environ.get("BENCH_BASELINE", BASELINE_REF)
    extra = os.environ.get("BENCH_STUDY_ARGS", "").split()
    precision = training_precision("auto", torch.device("cpu"), STUDY_MODEL)
    peaks = dense_peaks(precision)
    peak_name = max(peaks, key=peaks.get)
    peak = peaks[peak_name]
    print(f"whole-study utilisation: {baseline} vs this tree, peak {peak / 1e9:.0f} GFLOP/s")
    results = bench_study(baseline, extra)
    rows, utilisation = [], {}
    for label, r in results.items():
        utilisation[label] = r["flops"] / (r["seconds"] * peak)
        rows.append(
            f"| {label} | {r['seconds']:.0f} | {r['runs']:.0f} | {r['flops'] / 1e12:.2f} "
            f"| {r['flops'] / r['seconds'] / 1e9:.1f} | {utilisation[label]:.1%} |"
        )
    a, b = utilisation.values()
    ratio = b / a if a > 0 else float("nan")
    command = f"search --step {STUDY_STEP} --model {STUDY_MODEL} --seed 0 {' '.join(extra)}"
    lines = [
        STUDY_SECTION,
        "",
        measured_on,
        "",
        f"Baseline commit (A, `BENCH_BASELINE`): {baseline}.",
        "",
        f"`python -m experiments {command.strip()}` (the default CPU budget unless flags are "
        "shown), run by the baseline commit (A) and by this tree (B), one after the other, each "
        f"from its own checkout into its own throw-away store, on {torch.get_num_threads()} "
        "thread(s). Wall time: the whole process. FLOPs: 3 x forward FLOPs x training images "
        "x epochs run, plus a forward per validation image per epoch, summed over every run of "
        "the study, counted alike for both from the runs they logged. Peak: the best dense "
        f"kernel in {precision} measured in this run ({peak_name}, {peak / 1e9:.1f} GFLOP/s).",
        "",
        "| code | wall s | runs | TFLOP | GFLOP/s | utilisation |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"B / A utilisation: **{ratio:.2f}x** (target >= {UTILISATION_TARGET:.0f}x).",
        "",
    ]
    target = (
        STUDY_TARGET,
        f"{ratio:.2f}x ({baseline})",
        ratio >= UTILISATION_TARGET,
    )
    return lines, [target]
