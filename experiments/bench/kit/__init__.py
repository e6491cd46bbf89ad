"""`make gpu-kit`: one folder (and a .tar of it) that runs `gpu-bench` on a GPU node that has
PyTorch but no internet.

The kit holds:

| path              | what                                                                  |
|-------------------|-----------------------------------------------------------------------|
| `run.sh`          | installs the wheels beside the system's torch, unpacks the data, runs |
| `wheels/`         | every runtime dependency a PyTorch node lacks (`runtime_pins`)        |
| `data/<SET>.npz`  | TRAIN, TEST and TEST2 packed losslessly (`data_tools.pack`)           |
| `source.tar.gz`   | the project's packages, `pyproject.toml`, `Makefile`, lock and docs   |
| `PYTHON_VERSION`  | the Python the wheels are for                                         |
| `MANIFEST.md`     | commit, wheels, data fingerprints and sizes                           |

The node is taken to have torch, torchvision, numpy, pandas, scikit-learn, scipy and
matplotlib (`PROVIDED`): the wheels are the closure of the project's dependencies that stops
at those. MLflow comes as `mlflow-skinny`: the same `mlflow` package without the tracking
server's web UI and its dependencies (pyarrow alone is ~40 MB), which is all that training
and tracking into a local SQLite store use; `make ui` and `make serve` need full MLflow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from data_tools.datasets import RAW_SPLITS
from data_tools.pack import pack_set
from experiments.core import config

KIT_NAME = "glyph-gpu-kit"
MAX_MB = 60
PROVIDED = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "scipy", "matplotlib")
SWAPS = {"mlflow": "mlflow-skinny"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
SOURCE_PATHS = (
    "data_tools",
    "models",
    "experiments",
    "docs",
    "pyproject.toml",
    "Makefile",
    "requirements.lock",
    "README.md",
    "LICENSE",
)
RUN_SCRIPT = Path(__file__).with_name("run.sh")


def lock_pins(lock: Path) -> dict[str, str]:
    """`name -> version` of requirements.lock (names canonical)."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def _target_environment(python_version: str) -> dict[str, str]:
    """The marker environment of a CPython `python_version` on x86_64 Linux."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def runtime_pins(python_version: str, root: Path = config.PROJECT_ROOT) -> list[str]:
    """`name==version` of every runtime dependency a PyTorch node lacks, for `python_version`.

    The closure of pyproject.toml's dependencies, read from this environment's installed
    metadata, not descending into `PROVIDED`; versions from requirements.lock where it has
    them, else the installed ones.
    """
    environment = _target_environment(python_version)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lock = lock_pins(root / "requirements.lock")
    provided = {canonicalize_name(name) for name in PROVIDED}
    todo = [Requirement(text).name for text in project["dependencies"]]
    pins: dict[str, str] = {}
    while todo:
        name = canonicalize_name(todo.pop())
        name = SWAPS.get(name, name)
        if name in provided or name in pins:
            continue
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(
                f"{name}: not installed here, so its dependencies are unknown (make setup)"
            ) from None
        pins[name] = lock.get(name, installed.version)
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def download_wheels(pins: list[str], dest: Path, python_version: str) -> list[Path]:
    """Binary wheels of exactly `pins` (no dependency resolution: `pins` is the closure)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [
        *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
        *("--only-binary=:all:", "--implementation", "cp", "--python-version", python_version),
        *platforms,
        *("-d", str(dest), *pins),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        raise RuntimeError(f"pip download failed: {lines[-1].strip()}")
    return sorted(dest.glob("*.whl"))


def _source_files(root: Path) -> list[str]:
    """The files of SOURCE_PATHS: git's tracked and unignored ones, or a walk without git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--"]
            + list(SOURCE_PATHS),
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        names = sorted({os.fsdecode(name) for name in listed.split(b"\0") if name})
    except (OSError, subprocess.CalledProcessError):
        names = sorted(
            path.relative_to(root).as_posix()
            for top in SOURCE_PATHS
            for path in ([root / top] if (root / top).is_file() else (root / top).rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts
        )
    return [name for name in names if (root / name).is_file()]


def _commit(root: Path) -> str:
    """HEAD, with `-dirty` where the working tree differs; `unknown` without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def write_source(root: Path, out: Path) -> int:
    """`out` (.tar.gz) of the project's source files; returns how many."""
    files = _source_files(root)
    with tarfile.open(out, "w:gz") as archive:
        for name in files:
            archive.add(root / name, arcname=name, recursive=False)
    return len(files)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fill(kit: Path, data_dir: Path, wheels: list[Path], python_version: str) -> list[str]:
    """Wheels, packed data, source, run.sh and PYTHON_VERSION into `kit`; manifest lines."""
    (kit / "wheels").mkdir(parents=True)
    for wheel in wheels:
        shutil.copy2(wheel, kit / "wheels" / wheel.name)
    (kit / "data").mkdir()
    rows = []
    for name in RAW_SPLITS:
        done = pack_set(data_dir / name, kit / "data" / f"{name}.npz")
        rows.append(
            f"| {name} | {done['images']:,} | {done['values']} | {done['bytes'] / 1e6:.2f} MB |"
        )
    count = write_source(config.PROJECT_ROOT, kit / "source.tar.gz")
    shutil.copy2(RUN_SCRIPT, kit / "run.sh")
    (kit / "run.sh").chmod(0o755)
    (kit / "PYTHON_VERSION").write_text(python_version + "\n")
    wheel_rows = [f"| {w.name} | {w.stat().st_size / 1e6:.2f} MB |" for w in sorted(wheels)]
    return [
        "## Data (`data/`, `python -m data_tools.pack`)",
        "",
        "| set | images | distinct values | packed |",
        "|---|---|---|---|",
        *rows,
        "",
        f"## Wheels (`wheels/`, CPython {python_version}, manylinux x86_64)",
        "",
        "| wheel | size |",
        "|---|---|",
        *(wheel_rows or ["| none: built without wheels | |"]),
        "",
        f"## Source (`source.tar.gz`): {count} files",
    ]


def _manifest(kit: Path, lines: list[str], python_version: str) -> None:
    text = [
        f"# {KIT_NAME}",
        "",
        f"Built {time.strftime('%Y-%m-%d %H:%M')} from commit {_commit(config.PROJECT_ROOT)}.",
        f"Python {python_version}; the node provides {', '.join(PROVIDED)}.",
        "Run: `./run.sh` (GPU), `./run.sh --tiny` (a check in seconds on a CPU).",
        "",
        *lines,
        "",
    ]
    (kit / "MANIFEST.md").write_text("\n".join(text))


def _replace(out: Path, name: str) -> Path:
    """`out/name`, cleared when it is a kit built before; anything else there is refused."""
    target = out / name
    if target.exists() and not (target / "MANIFEST.md").is_file():
        raise RuntimeError(f"{target}: exists and is not a kit; refusing to replace it")
    shutil.rmtree(target, ignore_errors=True)
    return target


def build_kit(
    out: Path,
    data_dir: Path,
    wheels: list[Path] | None = None,
    python_version: str = "3.12",
    max_mb: float = MAX_MB,
) -> tuple[Path, Path]:
    """Build `out/glyph-gpu-kit/` and `out/glyph-gpu-kit.tar`; returns both.

    `wheels`: the wheel files to ship; None downloads them (`runtime_pins`, PyPI).
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kit = _replace(out, KIT_NAME)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{KIT_NAME}-"))
    try:
        if wheels is None:
            pins = runtime_pins(python_version)
            wheels = download_wheels(pins, staging / ".download", python_version)
        lines = _fill(staging / KIT_NAME, data_dir, wheels, python_version)
        _manifest(staging / KIT_NAME, lines, python_version)
        shutil.rmtree(staging / ".download", ignore_errors=True)
        os.replace(staging / KIT_NAME, kit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tar = out / f"{KIT_NAME}.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(kit, arcname=KIT_NAME)
    size = _size(tar)
    if size > max_mb * 1e6:
        tar.unlink()
        raise RuntimeError(f"{kit}: {size / 1e6:.1f} MB, over the {max_mb:g} MB a kit may take")
    return kit, tar


def wheel_sources(folder: Path) -> list[Path]:
    """The wheels of a folder (for `--wheels-from`); a folder without any is refused."""
    found = sorted(Path(folder).glob("*.whl"))
    if not found:
        raise RuntimeError(f"{folder}: no wheels (*.whl) in this folder")
    return found


def summary(kit: Path, tar: Path) -> str:
    """One line per part of a built kit, with sizes."""
    parts = ["wheels", "data", "source.tar.gz"]
    sizes = ", ".join(f"{part} {_size(kit / part) / 1e6:.1f} MB" for part in parts)
    count = len(list((kit / "wheels").glob("*.whl")))
    return f"{tar}: {_size(tar) / 1e6:.1f} MB ({sizes}; {count} wheels)\nkit folder: {kit}"


def python_version_arg(text: str) -> str:
    if not re.fullmatch(r"3\.[0-9]{1,2}", text):
        raise ValueError(f"--python-version {text}: expected 3.N, e.g. 3.12")
    return text
