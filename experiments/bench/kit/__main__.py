"""`python -m experiments.bench.kit build [--out DIR] [--no-wheels | --wheels-from DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.cli import run
from experiments.bench.kit import (
    KIT_NAME,
    MAX_MB,
    build_kit,
    python_version_arg,
    runtime_pins,
    summary,
    wheel_sources,
)
from experiments.core import config


def _build(args: argparse.Namespace) -> None:
    python_version = python_version_arg(args.python_version)
    if args.no_wheels:
        wheels: list[Path] | None = []
    elif args.wheels_from:
        wheels = wheel_sources(Path(args.wheels_from))
    else:
        wheels = None
        print(f"downloading {len(runtime_pins(python_version))} wheels ...", flush=True)
    data = config.data_dir(args.data_dir)
    kit, tar = build_kit(Path(args.out), data, wheels, python_version, args.max_mb)
    print(summary(kit, tar))


def _pins(args: argparse.Namespace) -> None:
    print("\n".join(runtime_pins(python_version_arg(args.python_version))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.kit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help=f"build {KIT_NAME}/ and {KIT_NAME}.tar")
    build.add_argument("--out", default="build/gpu-kit", help="output folder (build/gpu-kit)")
    build.add_argument("--data-dir", help="datasets folder (default: $DATA_DIR, data/raw, shared)")
    wheels = build.add_mutually_exclusive_group()
    wheels.add_argument("--no-wheels", action="store_true", help="ship no wheels (tests)")
    wheels.add_argument("--wheels-from", help="ship the wheels of this folder, download nothing")
    for command in (build, commands.add_parser("pins", help="the wheels a kit ships")):
        command.add_argument(
            "--python-version", default="3.12", help="the node's Python (default 3.12)"
        )
    build.add_argument("--max-mb", type=float, default=MAX_MB, help=f"size limit ({MAX_MB} MB)")
    build.set_defaults(func=_build)
    commands.choices["pins"].set_defaults(func=_pins)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
