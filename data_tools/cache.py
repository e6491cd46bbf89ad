"""A cache of checked datasets, keyed on the state of every input file.

The key hashes, for every entry of the dataset folder, its name, size,
modification time, status-change time (`st_ctime_ns`) and inode. The status-change
time moves on every write and cannot be set back by tools such as `touch -d`
or `cp -p`, so a file rewritten under the same name with new content always
gets a new key. The key is computed from one `stat` per file (~0.2 s for
48,000 files), which is what lets a warm load skip reading the files.

The cache also stores `content_sha256`, a digest of the decoded images and
labels: the data fingerprint that runs record.

Entries are verified, never trusted: each carries a `checksum` (sha256 of its
content digest and its file list, the content digest being the sha256 of the
stored images and labels), and a load re-checks everything: arrays read through
the strict `.npy` parser (no pickle, no blocking open), dtypes and shapes,
finite values in [0, 1], labels in range, the file list equal to the folder's.
An entry that fails is removed and rebuilt from the dataset folder, with one
`warning:` line on stderr.

Writes are atomic (a temporary folder, then `os.replace`), and happen only after
every check has passed, so a failed load leaves no cache behind.
`load_cached_many` checks several folders before writing any entry.
"""

from __future__ import annotations

import array
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.cli import display_path, one_line
from data_tools.reader import (
    DatasetError,
    RawDataset,
    check_folder,
    load_npy,
    read_dataset,
    read_regular_file,
)

CACHE_VERSION = "2"  # 2: entries carry a checksum and are verified on load
_ENTRY_HEADER_BYTES = 64 * 1024  # room for a .npy header, on top of the data
_FILE_NAME_BYTES = 4 * 1024  # a stored file name: at most ~1,000 characters of 4 bytes


@dataclass(frozen=True)
class _FolderState:
    """What one `stat` pass over a dataset folder saw: the cache key and the image file names."""

    key: str
    files: frozenset[str]  # `<class folder>/<name>`, hidden names left out
    count: int


def _stat_row(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)  # dangling or unreadable: still part of the key
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _listdir(folder: str | Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []  # the reader reports the folder it cannot list


def _folder_state(root: Path, num_classes: int) -> _FolderState:
    """One `stat` per entry under `root` (two levels), hashed; any name works (bytes via fsencode)."""
    check_folder(root)
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{num_classes}".encode())
    files: list[str] = []
    for name in _listdir(root):
        folder = os.path.join(root, name)
        digest.update(os.fsencode(name) + f"\0{_stat_row(folder)}\n".encode())
        if not os.path.isdir(folder):
            continue
        names = _listdir(folder)
        prefix = folder + os.sep
        rows = array.array("q", [v for n in names for v in _stat_row(prefix + n)])
        digest.update(b"\0".join(map(os.fsencode, names)))
        digest.update(rows.tobytes())
        if not name.startswith("."):
            files.extend(f"{name}/{n}" for n in names if not n.startswith("."))
    return _FolderState(digest.hexdigest(), frozenset(files), len(files))


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the images' and labels' bytes: the data fingerprint that runs record."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images))
    digest.update(np.ascontiguousarray(labels))
    return digest.hexdigest()


def entry_checksum(digest: str, files: np.ndarray) -> str:
    """sha256 over a cache entry's content digest and its stored file list."""
    return hashlib.sha256(f"v{CACHE_VERSION}|{digest}|".encode() + files.tobytes()).hexdigest()


def _cache_prefix(root: Path) -> str:
    """Cache files of one dataset folder share a prefix: its name (made safe) and a hash of its path."""
    where = hashlib.sha256(os.fsencode(root)).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)[:64]
    return f"{safe}-{where}"


def _remove(path: Path) -> None:
    """Remove a cache entry, whatever it is (folder, file, symlink); never follows a symlink."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _write_entry(entry: Path, raw: RawDataset, digest: str) -> None:
    """Write one cache entry (a folder of .npy files) atomically: a temporary folder, then rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        files = np.array(raw.files, dtype=str)
        np.save(tmp / "images.npy", raw.images, allow_pickle=False)
        np.save(tmp / "labels.npy", raw.labels, allow_pickle=False)
        np.save(tmp / "files.npy", files, allow_pickle=False)
        (tmp / "content_sha256").write_text(digest)
        (tmp / "checksum").write_text(entry_checksum(digest, files))
        try:
            os.replace(tmp, entry)
        except OSError as exc:
            # another process wrote this entry meanwhile: the same name is the same folder
            # state, so its files are these; keep them (parallel jobs filling a new cache)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not entry.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _BadEntry(Exception):
    """Why a cache entry cannot be trusted."""


def _load_part(entry: Path, name: str, max_bytes: int) -> np.ndarray:
    try:
        return load_npy(entry / name, max_bytes)
    except DatasetError as exc:
        raise _BadEntry(f"{name}: {exc.problem}") from None


def _read_text(entry: Path, name: str) -> str:
    try:
        return read_regular_file(entry / name, 256).decode("ascii").strip()
    except (DatasetError, UnicodeDecodeError):
        raise _BadEntry(f"{name} is missing or unreadable") from None


def _check_values(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Finite image values in [0, 1] and labels in 0..num_classes-1 (NaN fails both min and max)."""
    low, high = images.min(), images.max()
    if not (low >= 0 and high <= 1):
        raise _BadEntry(f"image values span [{low:g}, {high:g}], expected finite values in [0, 1]")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise _BadEntry(f"labels outside 0..{num_classes - 1}")


def _verify_entry(entry: Path, state: _FolderState, num_classes: int) -> tuple[RawDataset, str]:
    """Read one cache entry and check all of it against its checksum and the dataset folder."""
    if entry.is_symlink() or not entry.is_dir():
        raise _BadEntry("not a folder")
    n = state.count
    if n == 0:
        raise _BadEntry("the dataset folder holds no files")
    images = _load_part(entry, "images.npy", _ENTRY_HEADER_BYTES + n * 28 * 28 * 4)
    labels = _load_part(entry, "labels.npy", _ENTRY_HEADER_BYTES + n * 8)
    files = _load_part(entry, "files.npy", _ENTRY_HEADER_BYTES + n * _FILE_NAME_BYTES)
    if images.dtype != np.float32 or images.shape != (n, 28, 28):
        raise _BadEntry(f"images are {images.dtype} {images.shape}, expected float32 ({n}, 28, 28)")
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise _BadEntry(f"labels are {labels.dtype} {labels.shape}, expected int64 ({n},)")
    if files.dtype.kind != "U" or files.shape != (n,):
        raise _BadEntry(f"file list is {files.dtype} {files.shape}, expected {n} names")
    digest = content_digest(images, labels)
    if _read_text(entry, "content_sha256") != digest:
        raise _BadEntry("content_sha256 does not match the stored images and labels")
    if _read_text(entry, "checksum") != entry_checksum(digest, files):
        raise _BadEntry("checksum does not match the stored content")
    _check_values(images, labels, num_classes)
    names = tuple(files.tolist())
    if frozenset(names) != state.files or len(set(names)) != n:
        raise _BadEntry("file list differs from the dataset folder")
    return RawDataset(images, labels, names), digest


def _cached(entry: Path, state: _FolderState, num_classes: int) -> tuple[RawDataset, str] | None:
    """A verified cache entry, or None; a bad one is removed with one warning line."""
    if not os.path.lexists(entry):
        return None
    try:
        return _verify_entry(entry, state, num_classes)
    except _BadEntry as exc:
        why = one_line(str(exc))
        print(
            f"warning: {display_path(entry)}: cache entry failed verification ({why}); rebuilding",
            file=sys.stderr,
        )
        _remove(entry)
        return None


def _replace_entry(cache_dir: Path, root: Path, entry: Path, raw: RawDataset, digest: str) -> None:
    """Remove this folder's stale entries (listed, not globbed: names may hold `*`), then write."""
    prefix = f"{_cache_prefix(root)}-"
    for name in os.listdir(cache_dir) if cache_dir.is_dir() else []:
        if name.startswith(prefix) and name != entry.name:  # this name: another process's, new
            _remove(cache_dir / name)
    _write_entry(entry, raw, digest)


def _resolve(root: str | os.PathLike) -> Path:
    path = Path(root)
    try:
        return path.resolve() if path.exists() else path
    except (OSError, RuntimeError, ValueError):
        return path  # the reader names the problem


def load_cached_many(
    roots: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike | None,
    num_classes: int = 6,
) -> list[tuple[RawDataset, str]]:
    """Load several dataset folders through the cache; return each one and its content digest.

    Every folder is read and checked before any cache entry is written, so if
    one is bad, none is cached. With `cache_dir=None` nothing is cached.
    """
    if cache_dir is None:
        raws = [read_dataset(_resolve(root), num_classes) for root in roots]
        return [(raw, content_digest(raw.images, raw.labels)) for raw in raws]
    cache_dir = Path(cache_dir)
    loaded: list[tuple[RawDataset, str]] = []
    to_write: list[tuple[Path, Path, RawDataset, str]] = []
    for root in map(_resolve, roots):
        state = _folder_state(root, num_classes)
        entry = cache_dir / f"{_cache_prefix(root)}-{state.key[:20]}"
        hit = _cached(entry, state, num_classes)
        if hit is None:
            raw = read_dataset(root, num_classes)  # raises before anything is written
            hit = (raw, content_digest(raw.images, raw.labels))
            to_write.append((root, entry, *hit))
        loaded.append(hit)
    for root, entry, raw, digest in to_write:
        _replace_entry(cache_dir, root, entry, raw, digest)
    return loaded


def load_cached(
    root: str | os.PathLike, cache_dir: str | os.PathLike | None, num_classes: int = 6
) -> tuple[RawDataset, str]:
    """Load a dataset folder through the cache; return it and its content digest.

    With `cache_dir=None` nothing is cached and the folder is read directly.
    """
    return load_cached_many([root], cache_dir, num_classes)[0]
