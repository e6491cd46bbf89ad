"""`python -m experiments bench`: speed measured side by side in one run, written to reports/bench.md.

Data section: reading the three raw datasets (48,000 files on the shipped
data) three ways in the same process:
  1. the plain loop, one `np.load(allow_pickle=False)` per file (the baseline);
  2. this project's cold read (no dataset cache): raw bytes + one decode per header group;
  3. this project's warm load (content-keyed cache hit).
When the process may drop the OS page cache (root on Linux), the plain loop
and the cold read are also timed with the page cache dropped first.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_tools.cache import load_cached
from data_tools.datasets import NUM_CLASSES, RAW_SPLITS
from data_tools.reader import list_files, read_dataset
from experiments import config


def _timed(fn: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _drop_page_cache() -> bool:
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


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_bench(out: str | None = None, sections: list[str] | None = None) -> Path:
    sections = sections or ["data"]
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {_machine()}. Written by `python -m experiments bench`.",
        "",
    ]
    if "data" in sections:
        root = config.data_dir()
        print(f"data: reading {root} three ways ...", flush=True)
        rows = bench_data(root)
        lines += [
            "## Data loading (TRAIN + TEST + TEST2)",
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
    path = config.reports_dir(out) / "bench.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return path
