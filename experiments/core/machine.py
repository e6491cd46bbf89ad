"""The machine a run or a measurement ran on, read at run time: CPU name, cores, native bf16."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512_BF16 or AMX), read at run time."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume not
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name and its bf16 support (Linux; elsewhere the platform's word)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({'with' if cpu_has_bf16() else 'without'} native bf16)"


def describe_machine() -> str:
    """One line naming the machine, as every measurement in reports/ states it."""
    return (
        f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def cpu_class() -> str:
    """The CPU class the project's time targets are stated for: "bf16" (AVX512_BF16 or AMX),
    "avx512" (AVX-512 without bf16) or "avx2" (neither), read at run time."""
    if cpu_has_bf16():
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "other"
    return "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
