"""`python -m models list`: every registered model, its size and its tunable hyperparameters."""

from __future__ import annotations

import argparse
import sys

from models import MODELS, by_cost, count_parameters, create_model, hyperparameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "list", help="list models with parameter counts and hyperparameters"
    )
    listing.add_argument(
        "--names",
        action="store_true",
        help="only the names on one line, the most expensive to study first (read by make)",
    )
    args = parser.parse_args(argv)
    if args.names:
        print(" ".join(by_cost()))
        return 0
    for name in MODELS:
        params = count_parameters(create_model(name))
        knobs = ", ".join(f"{k}={v}" for k, v in hyperparameters(name).items())
        print(f"{name:<13} {params:>10,} parameters   {knobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
