"""The command lines' contract: a problem the user can act on is one line on stderr and exit 2.

Text that reaches the terminal from outside (file names, exception messages)
goes through `one_line` or `display_path` first: control characters, line
separators and undecodable bytes are escaped, so a hostile name can neither
forge a second `error:` line nor send escape sequences to the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

USER_ERRORS = (ValueError, RuntimeError, OSError)  # DatasetError is a ValueError
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(text: str) -> str:
    """`text` with every non-printable character (newlines, ESC, U+2028, bidi controls) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as one printable line; backslashes are doubled so an escape cannot be faked."""
    text = os.fsdecode(path)
    if text.isprintable() and "\\" not in text:
        return text
    return one_line(text.replace("\\", "\\\\"))


def run(
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    redact: Callable[[str], str] = str,
    explain: Callable[[BaseException], str | None] = lambda exc: None,
) -> int:
    """Parse `argv`, run the chosen command, turn user errors into `error: ...` and status 2.

    `redact` rewrites the message before it is printed (the study CLI masks passwords);
    `explain` turns other exceptions the user can act on (a broken store, say) into their
    one line, or returns None for a bug, which keeps its traceback.
    """
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = str(exc) if isinstance(exc, USER_ERRORS) else explain(exc)
        if message is None:
            raise
        if os.environ.get("GLYPH_TRACEBACK") == "1":  # where it came from, for a bug report
            lines = redact(traceback.format_exc()).rstrip().splitlines()
            print("\n".join(one_line(line) for line in lines), file=sys.stderr)
        print(f"error: {one_line(redact(message))}", file=sys.stderr)
        return 2
    return 0
