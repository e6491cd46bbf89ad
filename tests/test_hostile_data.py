"""Hostile input, round 2: hangs, header parser crashes, forged error lines, trusted cache entries."""

from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_dataset

from data_tools import DatasetError
from data_tools.cache import load_cached
from data_tools.cli import run
from data_tools.reader import read_dataset

HANG_TIMEOUT_S = 60  # generous on a loaded 2-core machine; the fixed code answers in ~1 s


def _one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text and text.isprintable()


def _check_cli(root: Path | bytes) -> subprocess.CompletedProcess:
    """`python -m data_tools check ROOT`, bytes in and out, with a timeout that turns a hang into a failure."""
    return subprocess.run(
        [sys.executable, "-m", "data_tools", "check", os.fsencode(root)],
        capture_output=True,
        timeout=HANG_TIMEOUT_S,
    )


def _assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> str:
    assert proc.returncode == 2, proc.stderr
    stderr = proc.stderr.decode("utf-8")  # escaped: always valid UTF-8
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "\x1b" not in stderr
    assert expected in lines[0]
    return lines[0]


# 1. Special files: FIFOs, sockets, device files are refused without being opened.


def test_fifo_in_class_folder_is_refused_not_waited_on(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    os.mkfifo(root / "3" / "x.npy")
    line = _assert_one_error_line(_check_cli(root), "not a regular file (a FIFO)")
    assert line.startswith(f"error: {root / '3' / 'x.npy'}: ")


def test_socket_in_class_folder_is_refused(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    path = root / "2" / "s.npy"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(DatasetError, match="not a regular file \\(a socket\\)"):
            read_dataset(root)


def test_device_file_in_class_folder_is_refused(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    try:
        os.mknod(root / "2" / "null.npy", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(DatasetError, match="not a regular file \\(a character device\\)"):
        read_dataset(root)


def test_fifo_symlinked_from_inside_the_folder_is_refused(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    os.mkfifo(root / "3" / ".hidden_fifo")
    (root / "3" / "y.npy").symlink_to(root / "3" / ".hidden_fifo")
    _assert_one_error_line(_check_cli(root), "not a regular file (a FIFO)")


# 2. Malformed .npy headers: one DatasetError line, never a traceback or a warning.


def _npy(header: str, version: bytes = b"\x01\x00", data: bytes | None = None) -> bytes:
    """A `.npy` file with a hand-written header text, padded like numpy pads it."""
    size_len = 2 if version[0] == 1 else 4
    text = header.encode("latin1")
    pad = -(6 + 2 + size_len + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    size = len(text).to_bytes(size_len, "little")
    body = np.zeros((28, 28), np.float32).tobytes() if data is None else data
    return b"\x93NUMPY" + version + size + text + body


GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (28, 28), }"
MALFORMED_HEADERS = {
    "missing_closing_brace": (_npy(GOOD[:-1]), "unreadable .npy header"),
    "descr_empty_tuple": (_npy(GOOD.replace("'<f4'", "()")), "descr"),
    "descr_one_element_tuple": (_npy(GOOD.replace("'<f4'", "('<f4',)")), "descr"),
    "thousands_of_unary_minus": (
        _npy(GOOD.replace("(28, 28)", "(" + "-" * 5000 + "28, 28)")),
        "unreadable .npy header",
    ),
    "python2_long_shape": (_npy(GOOD.replace("(28, 28)", "(28L, 28L)")), "unreadable .npy header"),
    "bool_in_shape": (_npy(GOOD.replace("(28, 28)", "(True, 28, 28)")), "shape"),
    "format_version_1_1": (_npy(GOOD, version=b"\x01\x01"), "format version 1.1"),
    "format_version_4_0": (_npy(GOOD, version=b"\x04\x00"), "format version 4.0"),
    "descr_list": (_npy(GOOD.replace("'<f4'", "[('a', '<f4')]")), "unexpected '['"),
    "descr_unknown": (_npy(GOOD.replace("'<f4'", "'zz9'")), "dtype"),
    "descr_deprecated_alias": (_npy(GOOD.replace("'<f4'", "'a'")), "dtype"),
    "fortran_order_not_bool": (_npy(GOOD.replace("False", "0")), "fortran_order"),
    "shape_negative": (_npy(GOOD.replace("(28, 28)", "(-28, 28)")), "unreadable .npy header"),
    "shape_not_tuple": (_npy(GOOD.replace("(28, 28)", "(28)")), "shape"),
    "shape_huge_int": (_npy(GOOD.replace("(28, 28)", "(" + "9" * 5000 + ", 28)")), "shape"),
    "leading_zero_int": (_npy(GOOD.replace("(28, 28)", "(028, 28)")), "unreadable .npy header"),
    "extra_key": (_npy(GOOD.replace("}", "'x': 1, }")), "keys"),
    "duplicate_key": (_npy(GOOD.replace("}", "'shape': (28, 28), }")), "twice"),
    "missing_key": (_npy("{'descr': '<f4', 'shape': (28, 28), }"), "keys"),
    "not_a_dict": (_npy("[1, 2, 3]"), "unreadable .npy header"),
    "header_not_latin1_text": (_npy("{'descr': '\u00e9', }"), ".npy header"),
    "header_len_past_end": (b"\x93NUMPY\x01\x00\x40\x00{", "truncated .npy header"),
    "header_too_long": (b"\x93NUMPY\x01\x00\xff\xff{", "longer than 10000 bytes"),
    "code_in_header": (_npy(GOOD.replace("False", "__import__('os')")), "unreadable .npy header"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_header_is_one_dataset_error_and_no_warning(tmp_path, case):
    blob, expected = MALFORMED_HEADERS[case]
    root = write_dataset(tmp_path / "DS", per_class=2)
    path = root / "4" / "bad.npy"
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning numpy prints is a failure too
        with pytest.raises(DatasetError) as info:
            read_dataset(root)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert _one_line(message)


def test_python2_header_prints_no_warning_lines_in_the_cli(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    (root / "4" / "old.npy").write_bytes(MALFORMED_HEADERS["python2_long_shape"][0])
    _assert_one_error_line(_check_cli(root), "unreadable .npy header")


def test_accepted_header_variants_match_numpy(tmp_path):
    """What numpy writes, in all three format versions, and big-endian and Fortran order, still reads."""
    root = write_dataset(tmp_path / "DS", per_class=2)
    image = np.linspace(0, 1, 784, dtype=np.float32).reshape(28, 28)
    variants = {
        "v2.npy": _npy(GOOD, b"\x02\x00", image.tobytes()),
        "v3.npy": _npy(GOOD, b"\x03\x00", image.tobytes()),
        "be.npy": _npy(GOOD.replace("<f4", ">f4"), data=image.astype(">f4").tobytes()),
        "f.npy": _npy(GOOD.replace("False", "True"), data=image.T.tobytes()),
        "tight.npy": _npy(
            "{'shape':(28,28),'fortran_order':False,'descr':'<f4'}", data=image.tobytes()
        ),
        "dq.npy": _npy(
            '{"descr": "<f4", "fortran_order": False, "shape": (1, 28, 28,)}', data=image.tobytes()
        ),
    }
    for name, blob in variants.items():
        (root / "5" / name).write_bytes(blob)
        assert np.array_equal(np.load(root / "5" / name, allow_pickle=False).reshape(28, 28), image)
    raw = read_dataset(root)
    for name in variants:
        assert np.array_equal(raw.images[raw.files.index(f"5/{name}")], image), name


# 3. One error is always one line, and names the file.


def test_newline_in_file_name_cannot_forge_a_second_error_line(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    (root / "2" / "a\nerror: everything is fine.npy").write_bytes(b"garbage")
    line = _assert_one_error_line(_check_cli(root), "bad magic")
    assert "a\\nerror: everything is fine.npy" in line


def test_ansi_escape_in_file_name_does_not_reach_the_terminal(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    (root / "2" / "\x1b[2J\x1b[31mred.npy").write_bytes(b"garbage")
    line = _assert_one_error_line(_check_cli(root), "bad magic")
    assert "\\x1b[2J\\x1b[31mred.npy" in line


def test_unicode_line_separators_are_escaped(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    (root / "2" / "a\u2028b\u0085c\u202e.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as info:
        read_dataset(root)
    assert len(str(info.value).splitlines()) == 1
    assert "a\\u2028b\\x85c\\u202e.npy" in str(info.value)


def test_non_utf8_file_name_is_refused_naming_the_file(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    np.save(os.fsdecode(os.fsencode(root / "2") + b"/img_\xff.npy"), np.zeros((28, 28), np.float32))
    with pytest.raises(DatasetError) as info:
        load_cached(root, tmp_path / "cache")
    assert str(info.value) == f"{root / '2'}/img_\\xff.npy: file name is not valid UTF-8"
    _assert_one_error_line(_check_cli(root), "img_\\xff.npy: file name is not valid UTF-8")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_non_utf8_dataset_folder_is_refused(tmp_path):
    root = os.fsencode(tmp_path) + b"/DS\xfe"
    write_dataset(Path(os.fsdecode(root)), per_class=2)
    line = _assert_one_error_line(_check_cli(root), "DS\\xfe: file name is not valid UTF-8")
    assert line == f"error: {tmp_path}/DS\\xfe: file name is not valid UTF-8"


def test_unicode_digits_in_file_names_sort_without_crashing(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    for i, name in enumerate(
        ["a1\u00b22.npy", "a_\u0661.npy", "a_2.npy", "a_10.npy", "\u00b2.npy"]
    ):
        np.save(root / "1" / name, np.full((28, 28), i / 10, np.float32))
    raw = read_dataset(root)
    assert len(raw.files) == 17


def test_dataset_folder_named_with_glob_characters_caches(tmp_path):
    root = write_dataset(tmp_path / "a**b[x]?", per_class=2)
    cache = tmp_path / "cache"
    first, digest = load_cached(root, cache)
    again, digest_again = load_cached(root, cache)
    assert digest_again == digest and len(first.files) == 12
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("kind", ["self", "pair"])
def test_symlink_loop_names_the_file(tmp_path, kind):
    root = write_dataset(tmp_path / "DS", per_class=2)
    link = root / "3" / "loop.npy"
    if kind == "self":
        link.symlink_to(link)
    else:
        (root / "3" / "other.npy").symlink_to(link)
        link.symlink_to(root / "3" / "other.npy")
    with pytest.raises(DatasetError) as info:
        load_cached(root, tmp_path / "cache")
    assert str(info.value).startswith(f"{root / '3'}/") and "symlink loop" in str(info.value)
    _assert_one_error_line(_check_cli(root), "symlink loop")


def test_dataset_folder_that_is_a_symlink_loop(tmp_path):
    root = tmp_path / "DS"
    root.symlink_to(root)
    with pytest.raises(DatasetError) as info:
        load_cached(root, tmp_path / "cache")
    assert str(info.value) == f"{root}: symlink loop"


def test_unlistable_class_folder_is_a_dataset_error(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "DS", per_class=2)
    scandir = os.scandir

    def refuse(path):  # what chmod 000 does, also when the tests run as root
        if os.fspath(path) == str(root / "2"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(DatasetError) as info:
        load_cached(root, tmp_path / "cache")
    assert str(info.value) == f"{root / '2'}: cannot list folder (Permission denied)"


def test_cli_run_prints_any_error_on_one_line(capsys):
    parser = argparse.ArgumentParser()

    def fail(args: argparse.Namespace) -> None:
        raise ValueError("first\nerror: forged\r\x1b[31m")

    parser.set_defaults(func=fail)
    assert run(parser, []) == 2
    err = capsys.readouterr().err
    assert err == "error: first\\nerror: forged\\r\\x1b[31m\n"


def test_paths_in_problem_text_are_escaped_too(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    data = (root / "1" / "img_0.npy").read_bytes()
    (root / "1" / "b\nc.npy").write_bytes(data)
    with pytest.raises(DatasetError) as info:
        read_dataset(root)
    assert _one_line(str(info.value)) and "duplicate of" in str(info.value)


# 4. Cache entries are verified, never trusted.


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def _plant_nan(entry: Path) -> None:
    np.save(entry / "images.npy", np.full(np.load(entry / "images.npy").shape, np.nan, np.float32))


def _plant_label_99(entry: Path) -> None:
    labels = np.load(entry / "labels.npy")
    labels[0] = 99
    np.save(entry / "labels.npy", labels)


def _plant_fingerprint(entry: Path) -> None:
    (entry / "content_sha256").write_text("0" * 64)


def _plant_malformed(entry: Path) -> None:
    (entry / "images.npy").write_bytes(MALFORMED_HEADERS["missing_closing_brace"][0])


def _plant_short_files(entry: Path) -> None:
    np.save(entry / "files.npy", np.array(["1/img_0.npy"]))


def _plant_pickle(entry: Path) -> None:
    np.save(entry / "files.npy", np.array([object()] * 12, dtype=object), allow_pickle=True)


def _plant_file(entry: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    entry.write_text("not an entry")


def _plant_symlink(entry: Path) -> None:
    import shutil

    target = entry.parent.parent / "elsewhere"
    shutil.copytree(entry, target)
    _plant_label_99(target)
    shutil.rmtree(entry)
    entry.symlink_to(target)


PLANTED = {
    "nan_images": _plant_nan,
    "label_99": _plant_label_99,
    "forged_fingerprint": _plant_fingerprint,
    "malformed_header": _plant_malformed,
    "files_count": _plant_short_files,
    "pickled_files": _plant_pickle,
    "entry_is_a_file": _plant_file,
    "entry_is_a_symlink": _plant_symlink,
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_cache_entry_is_rebuilt_with_one_warning(tmp_path, capsys, case):
    root = write_dataset(tmp_path / "DS", per_class=2)
    cache = tmp_path / "cache"
    truth, digest = load_cached(root, cache)
    entry = _entry(cache)
    PLANTED[case](entry)
    capsys.readouterr()
    raw, digest_again = load_cached(root, cache)
    assert digest_again == digest
    assert np.array_equal(raw.images, truth.images) and np.array_equal(raw.labels, truth.labels)
    assert raw.files == truth.files
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {entry}: cache entry failed verification")
    assert err[0].endswith("; rebuilding")
    # the rebuilt entry is trusted again: no warning on the next load
    load_cached(root, cache)
    assert capsys.readouterr().err == ""
    assert not entry.is_symlink() and entry.is_dir()


def test_planted_entry_with_a_consistent_checksum_is_still_validated(tmp_path, capsys):
    """Whoever can write the cache can recompute a checksum; the values are checked anyway."""
    from data_tools import cache as cache_module

    root = write_dataset(tmp_path / "DS", per_class=2)
    cache = tmp_path / "cache"
    truth, digest = load_cached(root, cache)
    entry = _entry(cache)
    images = np.full_like(truth.images, np.nan)
    bad = cache_module.RawDataset(images, truth.labels, truth.files)
    cache_module._remove(entry)
    cache_module._write_entry(entry, bad, cache_module.content_digest(images, truth.labels))
    capsys.readouterr()
    raw, _ = load_cached(root, cache)
    assert np.array_equal(raw.images, truth.images)
    assert "values" in capsys.readouterr().err


def test_fifo_planted_in_the_cache_does_not_hang(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    cache = tmp_path / "cache"
    load_cached(root, cache)
    entry = _entry(cache)
    (entry / "labels.npy").unlink()
    os.mkfifo(entry / "labels.npy")
    code = "import sys; from data_tools.cache import load_cached; load_cached(sys.argv[1], sys.argv[2])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root), str(cache)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_load_splits_writes_no_cache_entry_when_any_split_is_bad(tmp_path):
    from synthetic import write_study_data

    from data_tools.datasets import RAW_SPLITS, load_splits

    data = write_study_data(tmp_path / "data", per_class=3)
    (data / "TEST2" / "3" / "x.npy").write_bytes(b"garbage")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="TEST2"):
        load_splits(RAW_SPLITS, data, cache)
    assert not cache.exists() or not any(cache.iterdir()), (
        "TRAIN and TEST must not be cached either"
    )

    (data / "TEST2" / "3" / "x.npy").unlink()
    splits = load_splits(("TRAIN", "TRAIN2", "TEST2"), data, cache)
    assert list(splits) == ["TRAIN", "TRAIN2", "TEST2"]
    assert len(splits["TRAIN2"]) == 2 * len(splits["TRAIN"]) == 36
    assert len([p for p in cache.iterdir()]) == 2  # TRAIN and TEST2 entries
