"""The command lines' contract: a problem the user can act on is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

USER_ERRORS = (ValueError, RuntimeError, OSError)  # DatasetError is a ValueError


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen command, turn user errors into `error: ...` and status 2."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
