"""The GPU kit: datasets packed losslessly, and a kit whose run.sh runs gpu-bench offline."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_dataset, write_study_data

from data_tools.cache import load_cached_many
from data_tools.pack import main as pack_main
from data_tools.pack import pack, unpack
from experiments.bench.kit import KIT_NAME, build_kit, runtime_pins

SETS = ("TRAIN", "TEST", "TEST2")


def _grey_levels(root: Path) -> Path:
    """Every image on the 8-bit grid k / 255, one pixel -0.0 and one a float32 step off a level."""
    files = sorted(root.rglob("*.npy"))
    for path in files:
        image = np.load(path)
        np.save(path, (np.round(image * 255) / 255).astype(np.float32), allow_pickle=False)
    odd = np.load(files[0])
    odd[0, 0, 0] = -0.0
    odd[0, 0, 1] = np.nextafter(np.float32(128 / 255), np.float32(1))
    np.save(files[0], odd, allow_pickle=False)
    return root


@pytest.fixture
def grey_data(tmp_path) -> Path:
    return _grey_levels(write_study_data(tmp_path / "data", per_class=4))


def _fingerprints(root: Path) -> list[str]:
    return [digest for _, digest in load_cached_many([root / s for s in SETS], None)]


def test_pack_round_trip_is_byte_identical_and_keeps_the_fingerprints(grey_data, tmp_path):
    lines = pack(grey_data, tmp_path / "packed")
    assert [line.split(":")[0] for line in lines] == list(SETS)
    with np.load(tmp_path / "packed" / "TRAIN.npz", allow_pickle=False) as packed:
        assert packed["codes"].dtype == np.uint8 and packed["values"].dtype == np.float32
    unpack(tmp_path / "packed", tmp_path / "out")
    originals = sorted(p.relative_to(grey_data) for p in grey_data.rglob("*.npy"))
    assert originals == sorted(
        p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.npy")
    )
    for name in originals:
        assert (tmp_path / "out" / name).read_bytes() == (grey_data / name).read_bytes(), name
    assert _fingerprints(tmp_path / "out") == _fingerprints(grey_data)


def test_pack_refuses_more_values_than_its_codes_hold_naming_the_file(tmp_path, capsys):
    write_dataset(tmp_path / "data" / "TRAIN", per_class=25)  # noise: ~100,000 values
    assert pack_main(["pack", str(tmp_path / "data"), str(tmp_path / "out"), "--set", "TRAIN"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and ".npy: its set holds" in error and "65,536" in error


def test_unpack_refuses_a_stored_name_outside_its_class_folder(grey_data, tmp_path, capsys):
    pack(grey_data, tmp_path / "packed", sets=("TEST2",))
    path = tmp_path / "packed" / "TEST2.npz"
    with np.load(path, allow_pickle=False) as packed:
        arrays = dict(packed)
    arrays["files"] = arrays["files"].copy()
    arrays["files"][0] = "1/../../escaped.npy"
    np.savez_compressed(path, **arrays)
    assert pack_main(["unpack", str(tmp_path / "packed"), str(tmp_path / "out")]) == 2
    assert "is not <label>/<name>.npy" in capsys.readouterr().err
    assert not (tmp_path / "escaped.npy").exists() and not (tmp_path / "out" / "TEST2").exists()


def test_the_wheels_are_what_a_pytorch_node_lacks():
    names = {pin.split("==")[0] for pin in runtime_pins("3.12")}
    needed = {"mlflow-skinny", "optuna", "optuna-dashboard", "kornia", "sqlalchemy", "alembic"}
    assert needed | {"filelock", "tabulate", "tqdm"} <= names
    node = {"torch", "torchvision", "numpy", "pandas", "scikit-learn", "scipy", "matplotlib"}
    assert not names & (node | {"mlflow", "pyarrow", "triton"})
    assert not any(name.startswith("nvidia-") for name in names)


def _run_kit(kit: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MLRUNS_DIR")}
    env.update(PYTHON=python, OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", str(kit / "run.sh"), *args], capture_output=True, text=True, env=env, timeout=240
    )


def test_a_kit_built_without_wheels_runs_gpu_bench_tiny_from_its_tar(grey_data, tmp_path):
    kit, tar = build_kit(tmp_path / "built", grey_data, wheels=[], python_version="3.11")
    assert tar.stat().st_size < 5e6
    with tarfile.open(tar) as archive:
        archive.extractall(tmp_path / "node", filter="data")
    node_kit = tmp_path / "node" / KIT_NAME
    names = {path.name for path in node_kit.iterdir()}
    assert {"run.sh", "source.tar.gz", "data", "wheels", "MANIFEST.md", "PYTHON_VERSION"} <= names
    done = _run_kit(node_kit, "--tiny", "--skip-wheels", "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    gpu_md = (tmp_path / "work" / "reports" / "gpu.md").read_text()
    assert "(tiny mode)" in gpu_md and "| vgg " in gpu_md and "dry run (`make -n`" in gpu_md
    assert _fingerprints(tmp_path / "work" / "data") == _fingerprints(grey_data)


def test_run_sh_refuses_in_one_line(grey_data, tmp_path):
    kit, _ = build_kit(tmp_path / "built", grey_data, wheels=[], python_version="3.1")
    for python, problem in (
        ("no-such-python", "no such interpreter"),
        (sys.executable, "the wheels are for Python 3.1 and"),
    ):
        done = _run_kit(kit, "--tiny", python=python)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("run.sh: ") and problem in done.stderr
