"""`python -m data_tools fetch | check PATH | prepare | derive NAME --out DIR | analyze`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_tools import paths as config
from data_tools.cli import display_path, run
from data_tools.datasets import (
    DERIVED,
    RAW_SPLITS,
    load_dataset,
    load_split,
    load_splits,
    write_folder,
)
from data_tools.fetch import (
    HOW_TO_GET,
    SOURCE,
    fetch,
    fingerprint_notes,
    mask_secrets,
    shown,
    source_url,
)
from data_tools.reader import DatasetError


def _check(args: argparse.Namespace) -> None:
    from data_tools.analyze import summarize

    start = time.perf_counter()
    dataset = load_dataset(Path(args.path))  # no cache: a check reads every file
    s = summarize(dataset)
    print(f"{args.path}: OK, {s['images']:,} images in {time.perf_counter() - start:.2f} s")
    for label, count in enumerate(s["per_class"], start=1):
        print(f"  class {label}: {count:,}")
    print(f"  dtype {s['dtype']}, values in [{s['min']:.4f}, {s['max']:.4f}]")
    print(f"  background: {s['black_background']:,} black, {s['white_background']:,} white")


def _prepare(args: argparse.Namespace) -> None:
    """Check all three datasets first; cache entries are written only when every one passed."""
    root = config.data_dir(args.data_dir)
    if not root.is_dir():
        raise DatasetError(root, f"no datasets folder here: {HOW_TO_GET}")
    start = time.perf_counter()
    datasets = load_splits(RAW_SPLITS, root, config.cache_dir())
    for name, dataset in datasets.items():
        print(f"{name}: {len(dataset):,} images, fingerprint {dataset.fingerprint[:12]}")
    print(f"checked in {time.perf_counter() - start:.2f} s; cache: {config.cache_dir()}")
    for note in fingerprint_notes({n: d.fingerprint for n, d in datasets.items()}):
        print(f"warning: {note}", file=sys.stderr)


def _fetch(args: argparse.Namespace) -> None:
    target = (
        Path(args.out).expanduser().resolve() if args.out else config.PROJECT_ROOT / "data" / "raw"
    )
    if args.if_missing:  # `make reproduce`: fetch only when no datasets are found
        found = config.data_dir(args.data_dir)
        if all((found / name).is_dir() for name in RAW_SPLITS):
            print(f"datasets found in {display_path(found)}; nothing fetched")
            return
        named = args.data_dir or config.env_path("DATA_DIR")
        if named and not args.out:  # a folder the user named: fetched there, never elsewhere
            target = found
    print(f"fetching {shown(source_url(args.source))} into {display_path(target)} ...", flush=True)
    fetch(target, args.source)
    print(f"fetched TRAIN, TEST and TEST2 into {display_path(target)}; next: make data")


def _derive(args: argparse.Namespace) -> None:
    root = config.data_dir(args.data_dir)
    out = Path(args.out).resolve()
    if out.is_relative_to(root.resolve()):
        raise DatasetError(out, "refusing to write inside the read-only datasets folder")
    dataset = load_split(args.name, root, config.cache_dir())
    written = write_folder(dataset, out)
    print(f"{args.name}: {len(dataset):,} images written to {written}")


def _analyze(args: argparse.Namespace) -> None:
    """Figures and data_summary.md only; `python -m experiments analyze` also logs them to MLflow."""
    from data_tools.analyze import analyze_folders

    _, written = analyze_folders(config.data_dir(args.data_dir), config.reports_dir(args.out))
    for path in written:
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    parser.add_argument("--data-dir", help="datasets folder (default: $DATA_DIR, data/raw, shared)")
    commands = parser.add_subparsers(dest="command", required=True)

    fetch_ = commands.add_parser(
        "fetch", help="clone the published datasets into data/raw (never overwrites)"
    )
    fetch_.add_argument("--out", help="target folder (default: data/raw)")
    fetch_.add_argument(
        "--source", help=f"a URL git can clone (default: $GLYPH_DATA_SOURCE or {SOURCE})"
    )
    fetch_.add_argument(
        "--if-missing",
        action="store_true",
        help="only when no datasets folder is found ($DATA_DIR, data/raw, the shared copy)",
    )
    fetch_.set_defaults(func=_fetch)

    check = commands.add_parser("check", help="validate one dataset folder and print its numbers")
    check.add_argument("path", help="a dataset folder with class folders 1..6")
    check.set_defaults(func=_check)

    prepare = commands.add_parser("prepare", help="check TRAIN, TEST, TEST2 and fill the cache")
    prepare.set_defaults(func=_prepare)

    derive = commands.add_parser("derive", help="write a derived set in the original folder format")
    derive.add_argument("name", choices=sorted(DERIVED))
    derive.add_argument("--out", required=True, help="new or empty output folder")
    derive.set_defaults(func=_derive)

    analyze = commands.add_parser("analyze", help="figures and data_summary.md into reports/")
    analyze.add_argument("--out", help="reports folder (default: reports/)")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, redact=mask_secrets)  # no printed URL shows a password


if __name__ == "__main__":
    sys.exit(main())
