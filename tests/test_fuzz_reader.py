"""Fuzzing the reader: any bytes as a `.npy` file, any folder tree, give an image or one DatasetError line.

Never another exception, never a hang (a timer interrupts a blocked system
call), never a warning, and never an image that numpy itself would refuse or
read differently. The default run is short; `-m slow` runs many more examples.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import tempfile
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from data_tools import DatasetError
from data_tools.cache import load_cached
from data_tools.cli import display_path
from data_tools.reader import read_dataset

HANG_S = 10.0  # a blocked open or read is interrupted after this long: a hang is a failure
QUICK = settings(
    max_examples=200,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LONG = settings(QUICK, max_examples=5000)


class Hang(AssertionError):
    """The reader blocked: a FIFO, a device or a lock made it wait."""


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S) -> Iterator[None]:
    """Fail instead of waiting forever: SIGALRM interrupts a blocking system call."""

    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _note(outcome: str) -> None:
    """Count an outcome in Hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(re.sub(r"[0-9\[\],. -]+", " ", outcome.split("(")[0]).strip())


def _assert_one_line(message: str) -> None:
    assert message.isprintable() and len(message.splitlines()) == 1, repr(message)


def _minimal_dataset(root: Path) -> None:
    """Six class folders, one distinct valid image each."""
    for label in range(1, 7):
        (root / str(label)).mkdir(parents=True)
        np.save(root / str(label) / "a.npy", np.full((28, 28), label / 10, np.float32))


@pytest.fixture(scope="module")
def fuzz_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "DS"
        _minimal_dataset(root)
        yield root


def _numpy_reference(path: Path) -> np.ndarray:
    """The image numpy reads from `path`, scaled the way the reader scales it."""
    array = np.load(path, allow_pickle=False).reshape(28, 28)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    return array.astype(np.float32) / np.float32(255.0)


def check_blob(root: Path, blob: bytes) -> str:
    """The property: `blob` as a `.npy` file reads as numpy reads it, or is one DatasetError
    line. Returns which: "accepted" or "refused"."""
    path = root / "1" / "fuzz.npy"
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with no_hang():
                raw = read_dataset(root)
        except DatasetError as exc:
            _assert_one_line(str(exc))
            assert str(exc).startswith(f"{root}/"), str(exc)
            _note(f"refused: {exc.problem}")
            return "refused"
        _note("accepted")
        image = raw.images[raw.files.index("1/fuzz.npy")]
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert image.min() >= 0 and image.max() <= 1
        # accepted: numpy must accept it too, silently, and read the same image
        assert np.array_equal(image, _numpy_reference(path))
        return "accepted"


# ---- strategies: random bytes, mutated real files, and near-valid headers built from parts


def _saved(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


VALID_FILES = [
    _saved(np.full((28, 28), 0.55, np.float32)),  # no fixture image holds this value
    _saved(np.zeros((1, 28, 28), np.float64)),
    _saved(np.full((28, 28), 200, np.uint8)),
    _saved(np.asfortranarray(np.eye(28, dtype=np.float16))),
    _saved(np.full((28, 28), 7, ">i4")),
]

NUMERIC_DESCRS = ["<f4", "<f8", "<f2", "|u1", "<i4", ">f4", ">i2", "f4", "=f4", "|f4", "float32"]
ODD_DESCRS = ["|b1", "<U1", "|O", "O", "<c8", "uint8", "a", "a1", "zz", "<M8[ns]", "<V4", "S3", ""]
DESCRS = NUMERIC_DESCRS + ODD_DESCRS
DIMS = [0, 1, 28, 27, -1, 100_000, 10**20, True]
DIM_FORMATS = ["{}", "{}L", "{}.0", "0{}", "{}_0", "-{}", "--{}", "True", "False", "'{}'", "({},)"]
KEY_FORMATS = ["{!r}", "{!r}", '"{}"', "{}", "b{!r}"]
NASTY = [*"-(){},:L\\'\"#[0\n\x00\xe9", "True"]  # characters that break or bend a header


def _mostly(draw, plain, hostile: st.SearchStrategy, calm: int):
    """`plain`, or now and then (one time in `calm + 1`) a draw from `hostile`."""
    return plain if draw(st.integers(0, calm)) else draw(hostile)


# (descr written in the header, dtype of the data bytes): all what numpy reads as that dtype
PLAIN_TYPES = [(t, t) for t in ("<f4", "<f8", "|u1", "<i4", "<f2", ">f4", "=f8")]
PLAIN_TYPES += [("float32", "<f4"), ("u1", "|u1")]
FILLS = [0, 0.25, 1, 255, 300, -1, float("nan"), float("inf")]


HOSTILE_DESCR = st.one_of(
    st.sampled_from(DESCRS).map(repr),
    st.text(max_size=6).map(repr),
    st.sampled_from(["()", "('<f4',)", "[('a', '<f4')]", "4", "None", "b'<f4'", "'<f' '4'"]),
)
HOSTILE_FORTRAN = st.sampled_from(["0", "1", "'False'", "None", "false", "(False,)"])
HOSTILE_SHAPE = st.one_of(
    st.lists(st.sampled_from(DIMS), max_size=4).map(lambda d: repr(tuple(d))),
    st.tuples(st.sampled_from(DIM_FORMATS), st.sampled_from(DIMS)).map(
        lambda f: "(" + f[0].format(f[1]) + ", 28, 28)"
    ),
    st.sampled_from(["(28)", "[28, 28]", "(28, 28", "(,)", "28, 28", "(True, 28, 28)"]),
    st.integers(1, 3000).map(lambda n: "(" + "-" * n + "28, 28)"),
)
HOSTILE_VERSION = st.one_of(
    st.sampled_from([(2, 0), (3, 0), (1, 1), (0, 0), (4, 0)]),
    st.tuples(st.integers(0, 255), st.integers(0, 255)),
)


@st.composite
def near_valid_npy(draw) -> bytes:
    """A `.npy` file built from parts: version, length field, header dict text, data.

    Each part is what numpy writes, or now and then a plausible mistake; how
    often is drawn per example, so both accepted and refused files are common.
    """
    calm = draw(st.sampled_from([40, 8, 3]))

    def mostly(plain, hostile: st.SearchStrategy):
        return _mostly(draw, plain, hostile, calm)

    descr, data_type = draw(st.sampled_from(PLAIN_TYPES))
    dims = draw(st.sampled_from([(28, 28), (1, 28, 28)]))
    fortran = draw(st.booleans())
    values = {
        "descr": mostly(repr(descr), HOSTILE_DESCR),
        "fortran_order": mostly(repr(fortran), HOSTILE_FORTRAN),
        "shape": mostly(repr(dims), HOSTILE_SHAPE),
    }
    keys = mostly(list(values), st.permutations(list(values)).map(lambda k: k[:2]))
    quote = mostly("{!r}", st.sampled_from(KEY_FORMATS))
    items = [f"{quote.format(k)}: {values[k]}" for k in keys]
    items += mostly([], st.sampled_from([["'x': 1"], ["'shape': (28, 28)"], ["1: 2"]]))
    space = mostly(" ", st.sampled_from(["", "  ", "\n", "\t", "\r", "\x0c"]))
    text = "{" + f",{space}".join(items) + mostly(", ", st.sampled_from(["", ","])) + "}"
    for _ in range(mostly(0, st.integers(1, 3))):  # a few plausible typos
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at] + draw(st.sampled_from([*NASTY, ""])) + text[at + draw(st.integers(0, 2)) :]
        )
    body = text.encode(draw(st.sampled_from(["latin1", "utf-8"])), "replace")
    body = mostly(b"", st.sampled_from([b" ", b"\n", b"\t"])) + body
    body += b" " * draw(st.integers(0, 70)) + mostly(b"\n", st.sampled_from([b"", b"\n\n"]))
    version = mostly((1, 0), HOSTILE_VERSION)
    width = 2 if version[0] == 1 else 4
    length = mostly(len(body), st.integers(0, 2 ** (8 * width) - 1))
    prefix = b"\x93NUMPY" + bytes(version) + length.to_bytes(width, "little")
    fill = mostly(0.5 if data_type[1] == "f" else 128, st.sampled_from(FILLS))
    count = mostly(784, st.sampled_from([783, 785, 0, 1568]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting NaN or 300 to an integer type
        data = np.full(count, fill).astype(data_type).tobytes()
    return prefix + body + mostly(data, st.binary(max_size=8000))


@st.composite
def mutated_npy(draw) -> bytes:
    """A real `np.save` file with a few bytes flipped, inserted, deleted or cut off."""
    blob = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(blob) - 1, 0)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "header"]))
        if action == "flip" and blob:
            blob[at] = draw(st.integers(0, 255))
        elif action == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del blob[at : at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del blob[at:]
        elif action == "header" and blob:
            nasty = draw(st.sampled_from(NASTY)).encode("latin1")[0]
            blob[draw(st.integers(8, 127)) % len(blob)] = nasty
    return bytes(blob)


ANY_NPY = st.one_of(st.binary(max_size=2000), mutated_npy(), near_valid_npy())


def test_near_valid_strategy_reaches_acceptance(fuzz_root):
    """The structured strategy is not only noise: numpy's own files are accepted and read as
    numpy reads them (a reader that refused a valid file would fail here)."""
    for blob in VALID_FILES:
        assert check_blob(fuzz_root, blob) == "accepted"


@QUICK
@given(blob=ANY_NPY)
def test_fuzz_npy_bytes(fuzz_root, blob):
    check_blob(fuzz_root, blob)


@pytest.mark.slow
@LONG
@given(blob=ANY_NPY)
def test_fuzz_npy_bytes_long(fuzz_root, blob):
    check_blob(fuzz_root, blob)


# ---- the folder walker: hostile names and kinds of entry


NAME_BYTE = st.sampled_from([b for b in range(1, 256) if b != ord("/")])
NAME_BYTES = st.one_of(
    st.lists(NAME_BYTE, min_size=1, max_size=16).map(bytes),
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="/\0"), min_size=1, max_size=12
    ).map(os.fsencode),
    st.sampled_from(
        [
            b"x.npy",
            b"a\nerror: fake.npy",
            b"\x1b[31m.npy",
            b"\xff.npy",
            b"*.npy",
            b"a**b.npy",
            b"[x].npy",
            b"1",
            b"7",
            b"01",
            b".hidden.npy",
            b"\xe2\x80\xa8.npy",
            b"img_1\xc2\xb22.npy",
            b"-",
            b"~",
        ]
    ),
).filter(lambda b: b not in (b".", b".."))

KINDS = [
    "image",
    "garbage",
    "empty",
    "folder",
    "fifo",
    "link_inside",
    "link_outside",
    "link_self",
    "link_dangling",
    "link_folder",
]


def _make(path: bytes, kind: str, serial: int, outside: bytes) -> None:
    """Create one entry of `kind` at `path` (an existing name is left as it is)."""
    if os.path.lexists(path):
        return
    if kind == "image":
        with open(path, "wb") as handle:
            handle.write(_saved(np.full((28, 28), serial / 1000, np.float32)))
    elif kind == "garbage":
        with open(path, "wb") as handle:
            handle.write(b"\x93NUMPY\x01\x00garbage")
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_inside":
        os.symlink(b"a.npy", path)
    elif kind == "link_outside":
        os.symlink(outside, path)
    elif kind == "link_self":
        os.symlink(os.path.basename(path), path)
    elif kind == "link_dangling":
        os.symlink(b"missing.npy", path)
    else:
        os.symlink(b"..", path)


ENTRIES = st.lists(
    st.tuples(st.sampled_from(["", "1", "2", "6"]), NAME_BYTES, st.sampled_from(KINDS)),
    max_size=5,
)
ROOT_NAMES = st.one_of(st.just(b"DS"), NAME_BYTES)


def check_tree(root_name: bytes, entries: list[tuple[str, bytes, str]]) -> None:
    """The property for a folder tree: a dataset, or one DatasetError line naming a path in it."""
    with tempfile.TemporaryDirectory() as tmp:
        base = os.fsencode(tmp)
        root = base + b"/data/" + root_name
        _minimal_dataset(Path(os.fsdecode(root)))
        outside = base + b"/outside.npy"
        with open(outside, "wb") as handle:
            handle.write(_saved(np.full((28, 28), 0.9, np.float32)))
        for serial, (folder, name, kind) in enumerate(entries):
            parent = root + (b"/" + folder.encode() if folder else b"")
            _make(parent + b"/" + name, kind, serial, outside)
        cache = os.fsdecode(base + b"/cache")
        stderr = io.StringIO()
        try:
            with no_hang(), warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
                warnings.simplefilter("error")
                raw, digest = load_cached(os.fsdecode(root), cache)
                again, digest_again = load_cached(os.fsdecode(root), cache)
        except DatasetError as exc:
            _assert_one_line(str(exc))
            assert str(exc).startswith(display_path(root)), str(exc)
            assert not os.path.isdir(cache) or not os.listdir(cache), (
                "nothing cached after an error"
            )
            _note(f"refused: {exc.problem}")
            return "refused"
        _note("accepted")
        assert stderr.getvalue() == "", "a fresh entry must verify without a warning"
        assert digest_again == digest and again.files == raw.files
        assert all(name.encode("utf-8") for name in raw.files)
        assert len(raw.files) == len(set(raw.files)) == len(raw.labels) == len(raw.images)


@QUICK
@given(root_name=ROOT_NAMES, entries=ENTRIES)
def test_fuzz_folder_walker(root_name, entries):
    check_tree(root_name, entries)


@pytest.mark.slow
@LONG
@given(root_name=ROOT_NAMES, entries=ENTRIES)
def test_fuzz_folder_walker_long(root_name, entries):
    check_tree(root_name, entries)


def test_walker_known_hostile_trees():
    """The cases the fuzzer found first, as plain examples that always run."""
    for root_name, entries in [
        (b"DS", [("3", b"x.npy", "fifo")]),
        (b"DS", [("2", b"a\nerror: fake.npy", "garbage")]),
        (b"DS", [("2", b"\xff.npy", "image")]),
        (b"a**b", []),
        (b"DS\xfe", []),
        (b"DS", [("1", b"loop.npy", "link_self")]),
        (b"DS", [("1", b"img_1\xc2\xb22.npy", "image"), ("1", b"img_12.npy", "image")]),
    ]:
        check_tree(root_name, entries)


def test_hang_guard_works():
    """The guard itself: a blocking FIFO open is interrupted, not waited on forever."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "f")
        os.mkfifo(fifo)
        with pytest.raises(Hang), no_hang(0.2):
            open(fifo, "rb").close()


def test_equal_headers_written_differently_keep_each_file_its_own_image(tmp_path):
    """Found by the fuzzer in CI: a file whose header bytes differ from the first file's
    ('float32' for '<f4', same length) but parse the same joined the first file's group out
    of order, and the fast path then gave it another file's image."""
    root = tmp_path / "DS"
    _minimal_dataset(root)
    blob = _saved(np.full((28, 28), 0.5, np.float32))
    length = int.from_bytes(blob[8:10], "little")
    header = blob[10 : 10 + length].replace(b"'<f4'", b"'float32'").replace(b"    \n", b"\n")
    assert len(header) == length  # same offset: only the spelling of the dtype differs
    (root / "1" / "b.npy").write_bytes(blob[:10] + header + blob[10 + length :])
    raw = read_dataset(root)
    for name, image in zip(raw.files, raw.images, strict=True):
        assert np.array_equal(image, _numpy_reference(root / name)), name
