"""The command line, one module per command group: `python -m experiments <command>`.

Errors a user can act on (bad data, unknown step, model or setting) print one
line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse

from data_tools.cli import run
from experiments.cli import bench, inspect, models, results, study
from experiments.cli.common import PROFILE_CHOICES
from experiments.cli.faults import install_handlers, store_fault

__all__ = ["GROUPS", "PROFILE_CHOICES", "build_parser", "main"]

GROUPS = (study, results, models, inspect, bench)  # the order of `--help`


def build_parser() -> argparse.ArgumentParser:
    """The command line: each group module adds its subcommands."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from experiments.core.config import mask_secrets
    from experiments.search.process import final_status

    install_handlers()
    return final_status(run(build_parser(), argv, redact=mask_secrets, explain=store_fault))
