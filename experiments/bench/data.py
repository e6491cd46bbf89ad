"""Data loading: the raw datasets read three ways in one process (plain loop, cold read, cache hit)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from data_tools.cache import load_cached
from data_tools.datasets import NUM_CLASSES, RAW_SPLITS
from data_tools.reader import list_files, read_dataset
from experiments.bench.timing import timed
from experiments.core import config
from experiments.core.reports import Target


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

        t_plain = timed(plain)
        t_cold = timed(cold, repeats=2)
        t_warm = timed(warm, repeats=3)
    n = len(files)
    rows.append((f"plain np.load loop, {n:,} files (page cache warm)", t_plain, "baseline"))
    rows.append(
        ("cold read, no dataset cache (page cache warm)", t_cold, f"{t_plain / t_cold:.1f}x faster")
    )
    rows.append(("warm load, dataset cache hit", t_warm, f"{t_plain / t_warm:.1f}x faster"))
    if _drop_page_cache():
        t_plain_disk = timed(plain)
        _drop_page_cache()
        t_cold_disk = timed(cold)
        rows.append(("plain np.load loop, page cache dropped", t_plain_disk, "baseline"))
        rows.append(
            (
                "cold read, page cache dropped",
                t_cold_disk,
                f"{t_plain_disk / t_cold_disk:.1f}x faster",
            )
        )
    return rows


def data_section(measured_on: str) -> tuple[list[str], list[Target]]:
    """Data loading (TRAIN + TEST + TEST2): the section's lines and targets."""
    lines: list[str] = []
    targets: list[Target] = []
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
    return lines, targets
