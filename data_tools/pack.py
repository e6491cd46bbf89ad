"""Pack a datasets folder losslessly into one compressed file per set, and unpack it again.

The raw images hold few distinct float32 values (256 grey levels, and in TEST a few
hundred more that sit one float32 step beside a grey level), so a set is stored as codes
plus the table of the exact float32 values they stand for:

| array          | what                                                                |
|----------------|---------------------------------------------------------------------|
| `codes`        | uint8 `N x 784`: the low byte of each pixel's index into `values`   |
| `codes_high`   | uint8 `N x 784`: the high byte (zero for the 256 commonest values)  |
| `values`       | float32 `K` (K <= 65,536), commonest first, distinct by bit pattern |
| `labels`       | int64 `N`: 0..5 (class folder `1` is label 0)                       |
| `files`        | str `N`: `<class folder>/<name>.npy`, the reader's order            |
| `headers`      | uint8: the distinct `.npy` header bytes, one after another          |
| `header_ends`  | int64: where each header ends in `headers`                          |
| `header_index` | int64 `N`: each file's header                                       |
| `fingerprint`  | str: the set's content digest (the fingerprint runs record)         |

Each set is one `np.savez_compressed` file `<SET>.npz`, read back with `allow_pickle=False`.
`unpack` writes the original layout back byte for byte (the same header bytes, then the
same float32 values), reads the written folder with the strict reader and checks its
fingerprint against the stored one. Values are kept by bit pattern, so even `-0.0` and
`0.0` stay apart.

    python -m data_tools.pack pack DATA_DIR OUT_DIR      # TRAIN.npz, TEST.npz, TEST2.npz
    python -m data_tools.pack unpack PACKED_DIR OUT_DIR  # OUT_DIR/TRAIN/1/....npy, ...
"""

from __future__ import annotations

import argparse
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_tools.cache import content_digest
from data_tools.cli import run
from data_tools.datasets import NUM_CLASSES, RAW_SPLITS, new_folder
from data_tools.npy_header import Header, parse_header
from data_tools.reader import (
    IMAGE_SHAPE,
    DatasetError,
    check_duplicates,
    decode,
    list_files,
    read_all_bytes,
    read_dataset,
)

FORMAT = "glyph-pack-1"
PIXELS = math.prod(IMAGE_SHAPE)
MAX_VALUES = 65_536
FLOAT32 = np.dtype("<f4")
_MEMBERS = {
    "format": "U",
    "codes": "u",
    "codes_high": "u",
    "values": "f",
    "labels": "i",
    "files": "U",
    "headers": "u",
    "header_ends": "i",
    "header_index": "i",
    "fingerprint": "U",
}
_FILE_NAME = re.compile(r"([1-9][0-9]*)/([^/\x00]+\.npy)")


def _float32_header(path: str, blob: bytes) -> Header:
    """The header of one image file; only C-order little-endian float32 images are packed."""
    header = parse_header(blob)
    if isinstance(header, str):
        raise DatasetError(path, header)
    if header.dtype != FLOAT32 or header.fortran or math.prod(header.shape) != PIXELS:
        raise DatasetError(
            path, f"{header.dtype} {header.shape} image; packing takes C-order float32 images"
        )
    return header


def _codes(bits: np.ndarray, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low and high bytes of each pixel's code, float32 value table) of `N x 784` bit patterns.

    The table is ordered by frequency, so the 256 commonest values have one-byte codes and
    `codes_high` is zero almost everywhere (all zeros for at most 256 values); more than
    65,536 values are refused, naming the file that holds the first value past that.
    """
    table, first, counts = np.unique(bits.ravel(), return_index=True, return_counts=True)
    if len(table) > MAX_VALUES:
        extra = int(np.sort(first)[MAX_VALUES]) // PIXELS
        raise DatasetError(
            paths[extra],
            f"its set holds {len(table):,} distinct pixel values; packing stores at most "
            f"{MAX_VALUES:,} (16-bit codes)",
        )
    order = np.lexsort((table, -counts))  # commonest first, ties by bit pattern
    rank = np.empty(len(table), dtype=np.uint16)
    rank[order] = np.arange(len(table), dtype=np.uint16)
    codes = rank[np.searchsorted(table, bits)]
    low, high = (codes & 0xFF).astype(np.uint8), (codes >> 8).astype(np.uint8)
    return low, high, table[order].view(np.float32)


def pack_set(folder: str | os.PathLike, out_file: str | os.PathLike) -> dict[str, object]:
    """Pack one dataset folder into `out_file` (`.npz`); returns its images, values, size."""
    folder = Path(folder)
    pairs = list_files(folder, NUM_CLASSES)
    paths = [path for path, _ in pairs]
    blobs = read_all_bytes(paths)
    labels = np.fromiter((label for _, label in pairs), dtype=np.int64, count=len(pairs))
    images = decode(paths, blobs)  # every check the reader makes
    check_duplicates(paths, blobs, labels)
    header_ids: dict[bytes, int] = {}
    header_index = np.empty(len(paths), dtype=np.int64)
    bits = np.empty((len(paths), PIXELS), dtype="<u4")
    for i, (path, blob) in enumerate(zip(paths, blobs, strict=True)):
        header = _float32_header(path, blob)
        header_index[i] = header_ids.setdefault(bytes(blob[: header.offset]), len(header_ids))
        bits[i] = np.frombuffer(blob, "<u4", PIXELS, header.offset)
    codes, codes_high, values = _codes(bits, paths)
    skip = len(str(folder)) + 1
    files = np.array([path[skip:].replace(os.sep, "/") for path in paths], dtype=str)
    headers = list(header_ids)
    arrays = {
        "format": np.array(FORMAT),
        "codes": codes,
        "codes_high": codes_high,
        "values": values,
        "labels": labels,
        "files": files,
        "headers": np.frombuffer(b"".join(headers), dtype=np.uint8),
        "header_ends": np.cumsum([len(h) for h in headers], dtype=np.int64),
        "header_index": header_index,
        "fingerprint": np.array(content_digest(images, labels)),
    }
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with open(tmp, "wb") as stream:
        np.savez_compressed(stream, **arrays)
    os.replace(tmp, out_file)
    return {"images": len(paths), "values": len(values), "bytes": out_file.stat().st_size}


def _load(packed: Path) -> dict[str, np.ndarray]:
    """The arrays of one packed set, each of the expected kind; anything else is refused."""
    try:
        with np.load(packed, allow_pickle=False) as data:
            arrays = {name: data[name] for name in _MEMBERS if name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(packed, f"not a packed dataset ({exc})") from None
    missing = [name for name in _MEMBERS if name not in arrays]
    if missing:
        raise DatasetError(packed, f"not a packed dataset (no {', '.join(missing)})")
    wrong = [name for name, kind in _MEMBERS.items() if arrays[name].dtype.kind != kind]
    wrong += ["values"] if arrays["values"].dtype != FLOAT32 else []
    wrong += [n for n in ("codes", "codes_high") if arrays[n].dtype != np.uint8]
    if wrong or str(arrays["format"]) != FORMAT:
        raise DatasetError(packed, f"not a {FORMAT} file (bad {', '.join(wrong) or 'format'})")
    n = len(arrays["files"])
    shapes = {
        "codes": (n, PIXELS),
        "codes_high": (n, PIXELS),
        "labels": (n,),
        "header_index": (n,),
        "values": (min(len(arrays["values"]), MAX_VALUES),),
    }
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise DatasetError(packed, f"{name} has shape {arrays[name].shape}, expected {shape}")
    arrays["codes"] = arrays["codes"] | (arrays.pop("codes_high").astype(np.int32) << 8)
    if n and (
        int(arrays["codes"].max()) >= len(arrays["values"])
        or int(arrays["header_index"].max()) >= len(arrays["header_ends"])
        or int(arrays["header_index"].min()) < 0
    ):
        raise DatasetError(packed, "a code or header index points past its table")
    return arrays


def _relative_name(packed: Path, name: str, label: int) -> tuple[str, str]:
    """(class folder, file name) of a stored name; a name that leaves its class folder is refused."""
    match = _FILE_NAME.fullmatch(name)
    if not match or match[2] in (".", "..") or int(match[1]) != label + 1:
        raise DatasetError(packed, f"stored file name {name!r} is not <label>/<name>.npy")
    return match[1], match[2]


def _write_files(packed: Path, arrays: dict[str, np.ndarray], root: Path) -> None:
    ends = arrays["header_ends"].tolist()
    starts = [0, *ends[:-1]]
    raw = arrays["headers"].tobytes()
    headers = [raw[start:end] for start, end in zip(starts, ends, strict=True)]
    images = arrays["values"][arrays["codes"]]
    labels = arrays["labels"].tolist()
    for i, (name, header) in enumerate(
        zip(arrays["files"].tolist(), arrays["header_index"], strict=True)
    ):
        folder, file_name = _relative_name(packed, name, labels[i])
        (root / folder).mkdir(exist_ok=True)
        with open(root / folder / file_name, "xb") as stream:
            stream.write(headers[header])
            stream.write(images[i].tobytes())


def unpack_set(packed: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write one packed set back as a dataset folder `out` (new or empty); returns its
    fingerprint, checked against the stored one by reading the written folder."""
    packed = Path(packed)
    arrays = _load(packed)
    with new_folder(out) as tmp:
        _write_files(packed, arrays, tmp)
        raw = read_dataset(tmp, NUM_CLASSES)
        digest = content_digest(raw.images, raw.labels)
        if digest != str(arrays["fingerprint"]):
            raise DatasetError(packed, "unpacked images do not match the stored fingerprint")
    return digest


def pack(data_dir: str | os.PathLike, out_dir: str | os.PathLike, sets=RAW_SPLITS) -> list[str]:
    """Pack each set of `data_dir` into `out_dir/<SET>.npz`; returns one line per set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in sets:
        done = pack_set(Path(data_dir) / name, out_dir / f"{name}.npz")
        lines.append(
            f"{name}: {done['images']:,} images, {done['values']} distinct values, "
            f"{done['bytes'] / 1e6:.1f} MB"
        )
    return lines


def unpack(packed_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Unpack every `<SET>.npz` of `packed_dir` into `out_dir/<SET>/`; one line per set."""
    found = sorted(Path(packed_dir).glob("*.npz"))
    if not found:
        raise DatasetError(packed_dir, "no packed sets (*.npz) in this folder")
    return [
        f"{path.stem}: fingerprint {unpack_set(path, Path(out_dir) / path.stem)[:12]}"
        for path in found
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.pack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_ = commands.add_parser("pack", help="one compressed file per set: codes + exact values")
    pack_.add_argument("data_dir", help="the datasets folder holding TRAIN, TEST, TEST2")
    pack_.add_argument("out", help="folder for <SET>.npz")
    pack_.add_argument("--set", action="append", help="repeatable (default: TRAIN TEST TEST2)")
    pack_.set_defaults(
        func=lambda a: print("\n".join(pack(a.data_dir, a.out, a.set or RAW_SPLITS)))
    )
    unpack_ = commands.add_parser("unpack", help="write the original folders back, checked")
    unpack_.add_argument("packed", help="folder of <SET>.npz")
    unpack_.add_argument("out", help="datasets folder to create (each set new or empty)")
    unpack_.set_defaults(func=lambda a: print("\n".join(unpack(a.packed, a.out))))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
