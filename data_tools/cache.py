"""A cache of checked datasets, keyed on the state of every input file.

The key hashes, for every entry of the dataset folder, its name, size,
modification time, status-change time (`st_ctime_ns`) and inode. The status-change
time moves on every write and cannot be set back by tools such as `touch -d`
or `cp -p`, so a file rewritten under the same name with new content always
gets a new key. The key is computed from one `stat` per file (~0.2 s for
48,000 files), which is what lets a warm load skip reading the files.

The cache also stores `content_sha256`, a digest of the decoded images and
labels: the data fingerprint that runs record.

Writes are atomic (a temporary folder, then `os.replace`), and happen only after
every check has passed, so a failed load leaves no cache behind.
"""

from __future__ import annotations

import array
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data_tools.reader import DatasetError, RawDataset, read_dataset

CACHE_VERSION = "1"


def _stat_row(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)  # dangling or unreadable: still part of the key
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def stat_key(root: Path, num_classes: int) -> str:
    """Hash of the name, size, mtime, ctime and inode of every entry under `root` (two levels).

    Every entry counts, valid or not, so any added, removed, renamed or
    rewritten file changes the key. One `stat` per file, no reading.
    """
    if not root.is_dir():
        raise DatasetError(root, "dataset folder does not exist")
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{num_classes}".encode())
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        digest.update(f"{name}\0{_stat_row(folder)}\n".encode())
        if not os.path.isdir(folder):
            continue
        names = sorted(os.listdir(folder))
        prefix = folder + os.sep
        rows = array.array("q", [v for n in names for v in _stat_row(prefix + n)])
        digest.update("\0".join(names).encode())
        digest.update(rows.tobytes())
    return digest.hexdigest()


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _cache_prefix(root: Path) -> str:
    """Cache files of one dataset folder share a prefix: its name and a hash of its path."""
    where = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return f"{root.name}-{where}"


def _write_entry(entry: Path, raw: RawDataset, digest: str) -> None:
    """Write one cache entry (a folder of .npy files) atomically: a temporary folder, then rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        np.save(tmp / "images.npy", raw.images, allow_pickle=False)
        np.save(tmp / "labels.npy", raw.labels, allow_pickle=False)
        np.save(tmp / "files.npy", np.array(raw.files, dtype=str), allow_pickle=False)
        (tmp / "content_sha256").write_text(digest)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_entry(entry: Path) -> tuple[RawDataset, str]:
    images = np.load(entry / "images.npy", allow_pickle=False)
    labels = np.load(entry / "labels.npy", allow_pickle=False)
    files = tuple(np.load(entry / "files.npy", allow_pickle=False).tolist())
    digest = (entry / "content_sha256").read_text().strip()
    if images.shape != (len(labels), 28, 28) or len(files) != len(labels) or len(digest) != 64:
        raise ValueError("inconsistent cache entry")
    return RawDataset(images, labels, files), digest


def load_cached(
    root: str | os.PathLike, cache_dir: str | os.PathLike | None, num_classes: int = 6
) -> tuple[RawDataset, str]:
    """Load a dataset folder through the cache; return it and its content digest.

    With `cache_dir=None` nothing is cached and the folder is read directly.
    """
    root = Path(root).resolve() if Path(root).exists() else Path(root)
    if cache_dir is None:
        raw = read_dataset(root, num_classes)
        return raw, content_digest(raw.images, raw.labels)
    cache_dir = Path(cache_dir)
    key = stat_key(root, num_classes)
    entry = cache_dir / f"{_cache_prefix(root)}-{key[:20]}"
    if entry.is_dir():
        try:
            return _read_entry(entry)
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry is rebuilt, never trusted
    raw = read_dataset(root, num_classes)  # raises before anything is written
    digest = content_digest(raw.images, raw.labels)
    for stale in cache_dir.glob(f"{_cache_prefix(root)}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _write_entry(entry, raw, digest)
    return raw, digest
