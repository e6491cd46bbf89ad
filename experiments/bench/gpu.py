"""`make gpu-bench`: one command for a lent GPU, appending a dated section to reports/gpu.md.

It measures, on whatever device torch sees (CUDA when there is one):
1. single-process training images/s of every registered model at batch 128 and 512 (the
   default settings, `precision=auto`, channels-last, random 28x28 images: speed does not
   depend on the pixels), with model-FLOP utilisation against a bf16 matmul measured in the
   same run; each eager and through the static step captured as a CUDA graph
   (experiments/training/graphs.py), side by side (both with a cosine schedule), with how far
   20 steps (3 eager warm-up steps, then 17 through the graph) land from the same 20 steps
   run uncaptured (`graph_agreement`: 0 is bit for bit; a graph that froze the learning
   rate lands about a whole update away, about 1);
2. the wall time of `make reproduce PROFILE=gpu` into a throw-away store, bounded by
   `--reproduce-timeout`, with the environment's `JOBS` (processes sharing the GPU) and
   `GLYPH_CUDA_GRAPHS` (graphed steps in the runs) named in its line;
3. GPU utilisation and memory, sampled from `nvidia-smi` every 2 s while both run.

`--tiny` runs the same script in seconds on a CPU (a few images, small batches, `make -n
reproduce` instead of the real one), so the test suite knows it works before a GPU is lent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.core import config
from experiments.core.machine import describe_machine


@dataclass
class Sampler:
    """`nvidia-smi` utilisation samples taken on a thread until `stop()`."""

    interval: float = 2.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (s, util %, MiB)

    def start(self) -> Sampler:
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.wait(self.interval if self.samples else 0):
            if shutil.which("nvidia-smi") is None:
                return
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            util, memory = (float(v) for v in out.splitlines()[0].split(","))
            self.samples.append((time.perf_counter() - self._start, util, memory))

    def stop(self) -> list[tuple[float, float, float]]:
        self._stop.set()
        self._thread.join(timeout=15)
        return self.samples


def bf16_matmul_peak(device, size: int = 4096, repeats: int = 20) -> tuple[float, str]:
    """FLOP/s of a bf16 matmul on `device` (fp32 where bf16 is not native on a CPU), and which."""
    import torch

    from experiments.training.inference import training_precision

    dtype = torch.bfloat16 if training_precision("auto", device) == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start), str(dtype).split(".")[-1]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(name: str, batch: int, device, engine: str, precision: str, images):
    """A training step of model `name` as the runs build it (default settings, channels-last,
    the default augmentation). `engine`: "eager" (the loop and optimizer of every run),
    "graph" (the static step, captured as a CUDA graph on CUDA, with the optimizer a graph
    can replay: graphs.py) or "static" (the same step and optimizer, never captured)."""
    import torch

    from experiments.core.settings import TrainConfig
    from experiments.training.graphs import StaticStep
    from experiments.training.train import Stepper, make_optimizer, make_scheduler
    from models import create_model

    cfg = TrainConfig(model=name, batch_size=batch, schedule="cosine", epochs=1)
    prep = cfg.preprocessing().fit(images.cpu())
    model = create_model(name).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters(), engine != "eager" and device.type == "cuda")
    augment = prep.augmenter()
    step = Stepper(
        model,
        optimizer,
        torch.nn.CrossEntropyLoss(),
        batch,
        torch.Generator().manual_seed(0),
        scheduler=make_scheduler(cfg, optimizer, max(1, len(images) // batch)),
        augment=augment.to(device) if augment else None,
        precision=precision,
    )
    if engine != "eager":
        step.static = StaticStep(step, capture=engine == "graph" and device.type == "cuda")
    return step, prep


def training_rate(
    name: str, batch: int, images: int, device, graphed: bool = False
) -> tuple[float, str]:
    """Images/s of this project's training loop for model `name` at `batch` on `device`,
    eager or (`graphed`) through the static step."""
    import torch

    from experiments.training.inference import training_precision
    from experiments.training.train import train_one_epoch

    precision = training_precision("auto", device, name)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(images, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 6, (images,), generator=generator).to(device)
    step, prep = _stepper(name, batch, device, "graph" if graphed else "eager", precision, x)
    x = prep.transform(x)
    train_one_epoch(step, x[: 4 * batch], y[: 4 * batch])  # warm-up (and capture), allocator
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(step, x, y)
    _sync(device)
    return images / (time.perf_counter() - start), precision


def graph_agreement(name: str, batch: int, device, steps: int = 20) -> float:
    """How far `steps` training steps replayed from a CUDA graph land from the same steps run
    eagerly through the same static step and optimizer (never captured): the distance between
    the two final weight vectors over the length of the eager update. fp32, deterministic
    cuDNN, no dropout or augmentation, the same batches, and a cosine schedule that ends at 0
    on the last step, so a graph that froze the learning rate lands about a whole update
    away. 0 on a CPU, where nothing is captured."""
    import torch

    from experiments.training.train import train_one_epoch

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(steps * batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 6, (steps * batch,), generator=generator).to(device)
    weights = []
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        for engine in ("static", "graph"):
            torch.manual_seed(0)
            step, prep = _stepper(name, batch, device, engine, "fp32", x)
            step.augment = None
            for module in step.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                if hasattr(module, "drop_path_rate"):
                    module.drop_path_rate = 0.0
            start = torch.cat([p.detach().flatten().clone() for p in step.model.parameters()])
            train_one_epoch(step, prep.transform(x), y)
            end = torch.cat([p.detach().flatten() for p in step.model.parameters()])
            weights.append((start, end))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    (start, eager), (_, graphed) = weights
    return float((eager - graphed).norm() / (eager - start).norm())


def time_reproduce(tiny: bool, timeout: float) -> tuple[str, float]:
    """(what ran, seconds) of `make reproduce PROFILE=gpu` into a throw-away store. At the bound
    the whole process group is stopped (SIGTERM, which ends its runs KILLED, then SIGKILL), so no
    study keeps the GPU after the bench has moved on."""
    command = ["make", "-n" if tiny else "-s", "reproduce", "PROFILE=gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "MLRUNS_DIR": f"{tmp}/mlruns",
            "REPORTS_DIR": f"{tmp}/reports",
            "RESUME_DIR": f"{tmp}/resume",  # a run stopped at the bound leaves nothing behind
        }
        start = time.perf_counter()
        output = subprocess.DEVNULL if tiny else None
        try:
            process = subprocess.Popen(
                command,
                cwd=config.PROJECT_ROOT,
                env=env,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        except OSError as exc:
            return f"`{' '.join(command)}`: could not start ({exc.strerror})", 0.0
        try:
            code = process.wait(timeout=timeout)
            state = (
                ("dry run (`make -n`, tiny mode)" if tiny else "finished")
                if code == 0
                else f"failed (exit {code})"
            )
        except subprocess.TimeoutExpired:
            _stop_group(process)
            state = f"stopped at the {timeout:.0f} s bound, not finished"
    from experiments.training.graphs import ENV

    jobs = os.environ.get("JOBS", "").strip() or "default (one per core, at most 8)"
    graphs = os.environ.get(ENV, "").strip() or "0"
    settings = f"JOBS={jobs}, {ENV}={graphs}"
    return f"`{' '.join(command)}` ({settings}): {state}", time.perf_counter() - start


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL to what is left after 20 s."""
    import signal

    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_gpu_bench(
    out: str | None = None, tiny: bool = False, reproduce_timeout: float = 300.0
) -> Path:
    """Measure, print and append one section to `reports/gpu.md`; returns its path."""
    import torch

    from experiments.core.settings import resolve_device
    from experiments.training.inference import forward_flops
    from models import MODELS, create_model

    device = resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU: the CPU"
    batches, images = ((8, 16), 128) if tiny else ((128, 512), 51_200)
    sampler = Sampler().start()
    peak, dtype = bf16_matmul_peak(device, 1024 if tiny else 4096, 5 if tiny else 20)
    rows = []
    for model in MODELS:
        flops = 3 * forward_flops(create_model(model))
        for batch in batches:
            rate, precision = training_rate(model, batch, images, device)
            graphed, _ = training_rate(model, batch, images, device, graphed=True)
            apart = graph_agreement(model, batch, device, steps=4 if tiny else 20)
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "precision": precision,
                    "images/s": round(rate),
                    "MFU": f"{flops * rate / peak:.1%}",
                    "graphed images/s": round(graphed),
                    "graphed / eager": f"{graphed / rate:.2f}",
                    "graphed MFU": f"{flops * graphed / peak:.1%}",
                    "graph vs eager weights": f"{apart:.1e}",
                }
            )
            print(
                f"  {model:<13} batch {batch:>4} {precision}: {rate:9,.0f} img/s eager, "
                f"{graphed:9,.0f} graphed ({graphed / rate:.2f}x), weights apart {apart:.1e}",
                flush=True,
            )
    what, seconds = time_reproduce(tiny, reproduce_timeout)
    print(f"  {what} in {seconds:.1f} s", flush=True)
    samples = sampler.stop()
    section = _section(name, (peak, dtype), rows, what, seconds, samples, tiny)
    path = config.reports_dir(out) / "gpu.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = (
        path.read_text()
        if path.exists()
        else "# GPU measurements\n\nWritten by `make gpu-bench`, newest last.\n"
    )
    path.write_text(old.rstrip("\n") + "\n\n" + section)
    print(f"wrote {path}")
    return path


def _section(device, kernel, rows, what, seconds, samples, tiny) -> str:
    peak, dtype = kernel
    busy = [util for _, util, _ in samples]
    utilisation = (
        f"{len(busy)} samples, median {sorted(busy)[len(busy) // 2]:.0f} %, "
        f"max memory {max(m for _, _, m in samples):,.0f} MiB"
        if busy
        else "no `nvidia-smi` samples (no NVIDIA GPU)"
    )
    return "\n".join(
        [
            f"## {time.strftime('%Y-%m-%d')}: {device}{' (tiny mode)' if tiny else ''}",
            "",
            f"Machine: {describe_machine()}. Matmul peak in this run ({dtype}): "
            f"{peak / 1e12:.2f} TFLOP/s; MFU = 3 x forward FLOPs x images/s / that peak.",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
            f"- {what} in {seconds:.1f} s",
            f"- GPU utilisation: {utilisation}",
            "",
        ]
    )
