"""`python -m experiments bench`: run the chosen sections and merge them into reports/bench.md.

Each section is one function returning its markdown lines and its targets; a run
replaces only the sections it measured, so sections measured by other commands
(`--only compile`, a timed `make reproduce`) stay with their targets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from experiments.bench.data import data_section
from experiments.bench.kernels import (
    COMPILE_SECTION,
    COMPILE_TARGET,
    compile_section,
    depthwise_section,
    predict_section,
)
from experiments.bench.overhead import (
    REPRODUCE_SECTION,
    REPRODUCE_TARGET,
    bench_reproduce,
    logging_section,
)
from experiments.bench.study import STUDY_SECTION, STUDY_TARGET, study_section
from experiments.bench.training import precision_section, training_section
from experiments.core import config
from experiments.core.machine import describe_machine
from experiments.core.reports import Target, markdown_sections

SectionFn = Callable[[str], tuple[list[str], list[Target]]]
SECTIONS: dict[str, SectionFn] = {
    "data": data_section,
    "train": training_section,
    "precision": precision_section,
    "predict": predict_section,
    "depthwise": depthwise_section,
    "logging": logging_section,
    "compile": compile_section,
    "study": study_section,
}
DEFAULT_SECTIONS = ("data", "train", "precision", "predict", "depthwise", "logging")
HISTORY_SECTION = "## What was tried"
# measured only by `--only compile` / `--only study` / BENCH_FULL=1: a default run keeps them and their targets
KEPT_SECTIONS = (COMPILE_SECTION, REPRODUCE_SECTION, STUDY_SECTION)
KEPT_TARGETS = (COMPILE_TARGET, REPRODUCE_TARGET, STUDY_TARGET)
HEAD = """# Benchmarks

Written by `python -m experiments bench`; its last run: {machine}. Each section names the
machine it was measured on (the CPU varies between machines of this kind: with or without
AVX-512 and native bf16); a run replaces only the sections it measures.
"""
HISTORY = """## What was tried

What was kept, what was not and why, with the numbers of each measurement:
docs/performance.md; how the figures moved over time: CHANGELOG.md.
"""


def run_bench(out: str | None = None, sections: list[str] | None = None) -> Path:
    """Measure `sections` (default `DEFAULT_SECTIONS`), print the targets, write bench.md."""
    sections = list(dict.fromkeys(sections or DEFAULT_SECTIONS))
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; expected: {', '.join(SECTIONS)}")
    measured_on = f"Measured on {describe_machine()}, {time.strftime('%Y-%m-%d')}."
    lines = [HEAD.format(machine=describe_machine())]
    targets: list[Target] = []
    for name in sections:
        section_lines, section_targets = SECTIONS[name](measured_on)
        lines += section_lines
        targets += section_targets
    path = config.reports_dir(out) / "bench.md"
    old = path.read_text() if path.exists() else ""
    reproduce_lines, reproduce_targets = _reproduce_section(measured_on, old)
    lines += reproduce_lines + _gpu_section(out) + [HISTORY]
    targets += reproduce_targets
    fidelity = config.reports_dir(out) / "fidelity.md"
    if fidelity.exists():  # written by `python -m experiments fidelity` (slow), kept across runs
        lines += [fidelity.read_text(), ""]
    rows = _target_rows(targets)
    text = "\n".join(lines)
    if old:  # a run replaces what it measured (a default run: all but KEPT_SECTIONS)
        text, rows = _merge(old, text, rows, full=set(sections) == set(DEFAULT_SECTIONS))
    text += "\n".join(["## Targets", "", "| target | measured | |", "|---|---|---|", *rows, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path


def _reproduce_section(measured_on: str, old: str) -> tuple[list[str], list[Target]]:
    """`make reproduce` timed (BENCH_FULL=1), else a placeholder unless an old timing is kept."""
    if os.environ.get("BENCH_FULL") == "1":
        print("make reproduce at the default budget, into a temporary store ...", flush=True)
        seconds = bench_reproduce()
        text = f"{measured_on} Wall time into a fresh temporary store: {seconds / 60:.1f} min."
        target = Target(REPRODUCE_TARGET, f"{seconds / 60:.1f} min", seconds <= 1800)
        return [REPRODUCE_SECTION, "", text, ""], [target]
    if REPRODUCE_SECTION in markdown_sections(old)[1]:  # a timed one is kept across runs
        return [], []
    note = (
        "Not timed here: `BENCH_FULL=1 make bench` times it into a throw-away store; "
        "docs/reproduce.md has measured wall times."
    )
    return [REPRODUCE_SECTION, "", note, ""], []


def _gpu_section(out: str | None) -> list[str]:
    """Where the GPU figures are: reports/gpu.md (`make gpu-bench`), or that none are."""
    gpu = config.reports_dir(out) / "gpu.md"
    if gpu.exists():
        text = "GPU measurements (`make gpu-bench` on a machine with a CUDA GPU): reports/gpu.md."
    else:
        text = (
            "No GPU measurement yet: `make gpu-bench` on a machine with one writes reports/gpu.md."
        )
    return ["## GPU", "", text, ""]


def _target_rows(targets: list[Target]) -> list[str]:
    rows = []
    print("targets:")
    for name, measured, met in targets:
        verdict = "met" if met else "GAP"
        rows.append(f"| {name} | {measured} | {verdict} |")
        print(f"  {verdict:<4} {name:<45} {measured}")
    return rows


def _target_name(row: str) -> str:
    return row.split("|")[1].strip()


def _merge(old: str, new: str, rows: list[str], full: bool) -> tuple[str, list[str]]:
    """The file a run writes over `old`, without its Targets section, and the target rows.

    A partial run (`--only`): the old file, the run's sections in their place (new ones
    appended), the old targets it did not measure kept. A default run (`full`): its own
    sections in its order, with only the old sections another command measures
    (`KEPT_SECTIONS`) put back before the history, and only their targets.
    """
    _, old_parts = markdown_sections(old)
    head, new_parts = markdown_sections(new)
    old_rows = old_parts.pop("## Targets", "").splitlines()[4:]
    if full:
        kept = {k: v for k, v in old_parts.items() if k in KEPT_SECTIONS and k not in new_parts}
        merged: dict[str, str] = {}
        for heading, part in new_parts.items():
            if heading == HISTORY_SECTION:
                merged.update(kept)
            merged[heading] = part
        merged.update(kept)  # no-op when they went in before the history
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
