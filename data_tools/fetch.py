"""Getting the data: the published datasets, fetched once into `data/raw`, and their fingerprints.

The datasets are published with the original study at
github.com/stDem/ANN-numpy-array-images (folders TRAIN, TEST, TEST2 of `.npy` files).
`python -m data_tools fetch` clones that repository (or `GLYPH_DATA_SOURCE`: any URL git
can clone, `file://` included) and moves its three folders into place in one rename: it
never overwrites, and nothing half-fetched is left behind. `EXPECTED_FINGERPRINTS` are
those of the published data, so `make data` can say when results will not be comparable
with the committed reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from data_tools.reader import DatasetError

SOURCE = "https://github.com/stDem/ANN-numpy-array-images.git"
SPLIT_NAMES = ("TRAIN", "TEST", "TEST2")
EXPECTED_FINGERPRINTS = {  # sha256 of each published set's images and labels (Dataset.fingerprint)
    "TRAIN": "e5885453009be54fdbdc56841ac972fa9d579dc46910a7abef4254416d3d28d9",
    "TEST": "de6e79aa8a45ea59843f327bfdcc5f10bff871b1e3a7162e9dd0434fa0594780",
    "TEST2": "989ae2a1d4301fae53cfae3f4eb6161a8359815f6a7e41df860a3bb9ee26befc",
}
HOW_TO_GET = (
    f"get the datasets with `python -m data_tools fetch` (from {SOURCE.removesuffix('.git')}) "
    "or point DATA_DIR at a folder holding TRAIN, TEST and TEST2"
)


def source_url(override: str | None = None) -> str:
    return override or os.environ.get("GLYPH_DATA_SOURCE", "").strip() or SOURCE


def fetch(target: Path, source: str | None = None, timeout: float = 900) -> Path:
    """Clone `source` and move its TRAIN, TEST and TEST2 into `target` (new or empty)."""
    url = source_url(source)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(target, "already exists and is not empty; fetch never overwrites")
    if shutil.which("git") is None:
        raise DatasetError(target, "fetching needs git on the PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        clone = Path(scratch) / "clone"
        command = ["git", "clone", "--depth", "1", "--quiet", url, str(clone)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DatasetError(target, f"cloning {url} took longer than {timeout:.0f} s") from None
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["git failed"])[-1]
            raise DatasetError(target, f"cannot clone {url} ({reason})")
        missing = [name for name in SPLIT_NAMES if not (clone / name).is_dir()]
        if missing:
            raise DatasetError(target, f"{url} has no {', '.join(missing)} folder")
        staged = Path(scratch) / "raw"
        staged.mkdir()
        for name in SPLIT_NAMES:
            (clone / name).rename(staged / name)
        if target.exists():
            target.rmdir()  # empty, checked above
        staged.rename(target)  # one rename: all three folders appear together
    return target


def fingerprint_notes(fingerprints: dict[str, str]) -> list[str]:
    """One line per set whose fingerprint differs from the published data's."""
    return [
        f"{name}: fingerprint {value[:12]} differs from the published data's "
        f"({EXPECTED_FINGERPRINTS[name][:12]}): results will not be comparable with reports/"
        for name, value in fingerprints.items()
        if name in EXPECTED_FINGERPRINTS and value != EXPECTED_FINGERPRINTS[name]
    ]
