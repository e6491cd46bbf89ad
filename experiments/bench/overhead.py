"""What is not training: MLflow's share of a trial, and `make reproduce` as a whole."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from experiments.core import config
from experiments.core.reports import Target

REPRODUCE_SECTION = "## `make reproduce` at the default budget"
REPRODUCE_TARGET = "make reproduce <= 30 min"


def bench_logging(root: Path) -> tuple[float, float]:
    """(seconds in MLflow calls, seconds of the whole trial) for one small real trial."""
    import mlflow

    from experiments.core.settings import TrainConfig
    from experiments.core.steps import get_step
    from experiments.training.runner import load_step_data, train_and_log

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


def logging_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """MLflow logging share of a trial: the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
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
    return lines, targets
