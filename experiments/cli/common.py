"""What the command groups share: argument types and the reports-folder subcommand shape."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# the names of experiments.search.space.PROFILES, after "auto" (a test checks)
PROFILE_CHOICES = ["auto", "quick", "cpu", "full", "gpu"]


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def reports_command(
    commands, name: str, help_text: str, func: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    """A subcommand whose only option is the reports folder it writes into."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--out", help="reports folder (default: reports/)")
    command.set_defaults(func=func)
    return command


def add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--set KEY=VALUE` option."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=help_text)
