"""The `.npy` header, parsed strictly without eval: the versions, dtypes and layouts numpy writes.

`parse_header` returns a problem string instead of raising, so that the reader can name the
file in a one-line `DatasetError`.
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))  # the format versions numpy reads
MAX_HEADER_BYTES = 10_000  # numpy's own limit on header text


@dataclass(frozen=True)
class Header:
    offset: int  # where the data start
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool


_HEADER_CACHE: dict[bytes, Header | str] = {}


class HeaderError(Exception):
    """A problem in a header's text; only ever turned into a DatasetError message."""


# The header is a Python dict literal; this grammar is the part numpy writes:
# quoted strings, non-negative integers, True/False, flat tuples. No eval.
_SPACE = re.compile(r"[ \t\n]*")
_TOKEN = re.compile(
    r"""([{}():,])|'([^'\\\n]*)'|"([^"\\\n]*)"|(0|[1-9][0-9]*)(?![0-9A-Za-z_.])"""
    r"""|(True|False)(?![0-9A-Za-z_])"""
)
_DESCR = re.compile(r"[<>|=]?[A-Za-z][A-Za-z0-9]{0,15}")
_HEADER_KEYS = ["descr", "fortran_order", "shape"]


def _lex(text: str) -> list[tuple[str, str | int | bool]]:
    """Tokens `(kind, value)`: kind is the punctuation itself, `str`, `int` or `bool`."""
    tokens: list[tuple[str, str | int | bool]] = []
    pos = _SPACE.match(text).end()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise HeaderError(f"unexpected {text[pos]!r} at character {pos}")
        punct, single, double, number, boolean = match.groups()
        if punct:
            tokens.append((punct, punct))
        elif number is not None:
            if len(number) > 18:
                raise HeaderError("a shape dimension is too large")
            tokens.append(("int", int(number)))
        elif boolean:
            tokens.append(("bool", boolean == "True"))
        else:
            tokens.append(("str", single if single is not None else double))
        pos = _SPACE.match(text, match.end()).end()
    return tokens


class _Tokens:
    """A cursor over tokens, for the tiny recursive-descent parser below."""

    def __init__(self, tokens: list[tuple[str, str | int | bool]]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else "end of header"

    def take(self, kind: str | None = None) -> str | int | bool:
        found = self.peek()
        if found == "end of header" or (kind is not None and found != kind):
            raise HeaderError(f"expected {kind or 'a value'}, found {found}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]


def _sequence(tokens: _Tokens, close: str, item) -> tuple[list, bool]:
    """Comma-separated items up to `close`; also whether a trailing comma was there."""
    items, comma = [], False
    while tokens.peek() != close:
        items.append(item(tokens))
        comma = tokens.peek() == ","
        if not comma:
            break
        tokens.take(",")
    tokens.take(close)
    return items, comma


def _scalar(tokens: _Tokens) -> str | int | bool:
    if tokens.peek() not in ("str", "int", "bool"):
        raise HeaderError(f"expected a value, found {tokens.peek()}")
    return tokens.take()


def _value(tokens: _Tokens) -> str | int | bool | tuple:
    """A scalar, or a flat tuple of scalars (nothing nests, so nothing recurses)."""
    if tokens.peek() != "(":
        return _scalar(tokens)
    tokens.take("(")
    items, comma = _sequence(tokens, ")", _scalar)
    return items[0] if len(items) == 1 and not comma else tuple(items)


def _pair(tokens: _Tokens) -> tuple[str, object]:
    key = tokens.take("str")
    tokens.take(":")
    return key, _value(tokens)  # type: ignore[return-value]


def _header_dict(text: str) -> dict[str, object]:
    """The header dict, with exactly the keys descr, fortran_order, shape."""
    if not text.startswith("{"):
        raise HeaderError("the header is not a dict")
    tokens = _Tokens(_lex(text))
    tokens.take("{")
    pairs, _ = _sequence(tokens, "}", _pair)
    if tokens.peek() != "end of header":
        raise HeaderError("text after the closing brace")
    header: dict[str, object] = {}
    for key, value in pairs:
        if key in header:
            raise HeaderError(f"key {key!r} appears twice")
        header[key] = value
    if sorted(header) != _HEADER_KEYS:
        raise HeaderError("keys must be exactly 'descr', 'fortran_order', 'shape'")
    return header


def _dtype(descr: object) -> np.dtype:
    """A plain dtype string (`'<f4'`, `'|u1'`) as a dtype; numpy's warnings count as refusals."""
    if not isinstance(descr, str) or not _DESCR.fullmatch(descr):
        raise HeaderError("descr must be a plain dtype string such as '<f4'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return np.dtype(descr)
    except (
        Exception
    ):  # TypeError, or a deprecation turned into an error: not a dtype this reader reads
        raise HeaderError(f"unsupported dtype {descr!r}") from None


def _header_fields(text: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    header = _header_dict(text)
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(n) is int for n in shape):
        raise HeaderError("shape must be a tuple of non-negative integers")
    if type(fortran) is not bool:
        raise HeaderError("fortran_order must be True or False")
    return _dtype(header["descr"]), shape, fortran


def parse_header(blob: bytes) -> Header | str:
    """Parse a `.npy` header strictly; return a problem string instead of raising.

    Accepts only the format versions numpy reads (1.0, 2.0, 3.0) and a header
    that is a dict of a plain dtype string, a bool and a tuple of integers.
    """
    if len(blob) < 8 or blob[:6] != NPY_MAGIC:
        return "not a .npy file (bad magic bytes)"
    version = (blob[6], blob[7])
    if version not in NPY_VERSIONS:
        return f"unsupported .npy format version {version[0]}.{version[1]}"
    size_fmt, start = ("<H", 10) if version[0] == 1 else ("<I", 12)
    if len(blob) < start:
        return "truncated .npy header"
    (header_len,) = struct.unpack(size_fmt, blob[8:start])
    if header_len > MAX_HEADER_BYTES:
        return f"unreadable .npy header (longer than {MAX_HEADER_BYTES} bytes)"
    end = start + header_len
    if len(blob) < end:
        return "truncated .npy header"
    key = bytes(blob[:end])
    cached = _HEADER_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        text = blob[start:end].decode("ascii")
        result: Header | str = Header(end, *_header_fields(text))
    except UnicodeDecodeError:
        result = "unreadable .npy header (not ASCII text)"
    except HeaderError as exc:
        result = f"unreadable .npy header ({exc})"
    if len(_HEADER_CACHE) < 1024:
        _HEADER_CACHE[key] = result
    return result
