"""Result commands: `report`, `shift`, `analyze`, `fidelity` and `levers`, each writing reports/."""

from __future__ import annotations

import argparse

from experiments.cli.common import PROFILE_CHOICES, reports_command
from experiments.core.steps import STEPS
from models import MODELS


def _report(args: argparse.Namespace) -> None:
    from experiments.reporting.report import build_report, row_text

    out, rows = build_report(args.out, ensemble_k=args.ensemble, tta=args.tta)
    for step in STEPS:
        print(row_text(step, rows))
    print(f"wrote {out / 'comparison.md'}, comparison.csv, comparison.png")
    if args.ensemble:
        print(f"ensembles: {out / 'ensembles.csv'} (members in comparison.md)")


def _analyze(args: argparse.Namespace) -> None:
    from data_tools.analyze import analyze_folders
    from experiments.core import config
    from experiments.tracking.store import log_data_analysis

    summaries, written = analyze_folders(config.data_dir(), config.reports_dir(args.out))
    for path in written:
        print(f"wrote {path}")
    run_id = log_data_analysis(summaries, written)
    print(f"logged to MLflow run {run_id} (experiment data-analysis)")


def _shift_lines(model: str, m: dict) -> list[str]:
    """One model's shift findings as the lines `shift` prints."""
    aurocs = ", ".join(
        f"{k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("auroc_") and "_ci_" not in k
    )
    lines = [f"{model}: TEST acc {m['TEST_acc']:.3f}; AUROC {aurocs}"]
    for name in ("max_softmax", "mahalanobis", "background"):
        lines.append(
            f"  abstain by {name}: coverage {m[f'coverage_{name}']:.3f}, "
            f"accuracy on accepted {m[f'selective_acc_{name}']:.3f}"
        )
    curve = [
        f"k={k} {m[f'k{k}_TEST_rest_acc']:.3f}"
        for k in (1, 5, 20, 100)
        if f"k{k}_TEST_rest_acc" in m
    ]
    if curve:
        lines.append(f"  with k TEST labels per class of the new script: {', '.join(curve)}")
    if "selftrain_TEST_acc" in m:
        purity = m.get("kmeans_new_purity", float("nan"))
        lines.append(
            f"  self-training on unlabelled TEST: TEST acc {m['selftrain_TEST_acc']:.3f} "
            f"(white half {m['TEST_white_acc']:.3f} -> {m['selftrain_white_acc']:.3f}); "
            f"k-means purity on the new script {purity:.3f}"
        )
    return lines


def _shift(args: argparse.Namespace) -> None:
    from experiments.analysis.shift import run_shift
    from experiments.reporting.report import write_shift_report

    models = tuple(args.model or MODELS)
    results = run_shift(models, curve=not args.no_curve, adapt=not args.no_adapt)
    print(f"wrote {write_shift_report(args.out)}")
    for model, result in results.items():
        print("\n".join(_shift_lines(model, result.metrics)))


def _fidelity(args: argparse.Namespace) -> None:
    from experiments.search.fidelity import write_fidelity

    write_fidelity(args.out)


def _levers(args: argparse.Namespace) -> None:
    from experiments.analysis.levers import write_levers

    write_levers(args.out)


def _points(args: argparse.Namespace) -> None:
    from experiments.reporting import points

    if args.started is None:
        written = points.render(args.out)
    else:
        from experiments.search.space import resolve_profile

        profile = resolve_profile(args.profile)
        written = points.record(profile, args.started, args.out, args.setup_done)
    print("wrote " + ", ".join(str(p) for p in written))


def _add_points(commands) -> None:
    found = commands.add_parser(
        "points",
        help="the operating-points table: this profile's row after `make reproduce` "
        "(--profile, --started), or the tables again from operating_points.csv",
    )
    found.add_argument(
        "--profile",
        choices=PROFILE_CHOICES,
        default="auto",
        help="the profile `make reproduce` ran (auto: gpu where CUDA is available, else cpu)",
    )
    found.add_argument(
        "--started", type=float, help="when `make reproduce` started, in seconds since 1970"
    )
    found.add_argument(
        "--setup-done",
        type=lambda text: float(text) if text.strip() else None,
        help="when its install, fetch and data check ended (the rest: studies and report)",
    )
    found.add_argument("--out", help="reports folder (default: reports/)")
    found.set_defaults(func=_points)


def _add_report(commands) -> None:
    report = commands.add_parser("report", help="build the comparison table from MLflow")
    report.add_argument("--out", help="output folder (default: reports/)")
    report.add_argument(
        "--ensemble",
        type=int,
        default=3,
        metavar="K",
        help="ensemble rows: best K final runs of each TEST2 step, and all Task 2 runs "
        "(default 3; 0: none)",
    )
    report.add_argument(
        "--tta", action="store_true", help="also score the ensembles with test-time augmentation"
    )
    report.set_defaults(func=_report)


def _add_shift(commands) -> None:
    shift = commands.add_parser("shift", help="Task 1: new-script detectors, selective prediction")
    shift.add_argument(
        "--model", action="append", choices=list(MODELS), help="repeatable (default: all)"
    )
    shift.add_argument("--out", help="reports folder (default: reports/)")
    shift.add_argument(
        "--no-curve", action="store_true", help="skip the label-efficiency curve (k TEST labels)"
    )
    shift.add_argument(
        "--no-adapt",
        action="store_true",
        help="skip unsupervised adaptation (self-training, k-means on unlabelled TEST images)",
    )
    shift.set_defaults(func=_shift)


def _progress(args: argparse.Namespace) -> None:
    from experiments.reporting.progress import progress_text

    print(progress_text())


def add_commands(commands) -> None:
    _add_report(commands)
    _add_points(commands)
    progress = commands.add_parser(
        "progress",
        help="where make reproduce stands: each study's state, trials, answer and seeds, and "
        "the lane-minutes of the runs so far (read from the store; safe while it runs)",
    )
    progress.set_defaults(func=_progress)
    _add_shift(commands)
    analyze = "data figures and data_summary.md, logged as a data-analysis MLflow run"
    reports_command(commands, "analyze", analyze, _analyze)
    fidelity = "slow: trial-score vs final-score rank correlation per trial fidelity"
    reports_command(commands, "fidelity", fidelity, _fidelity)
    levers = "slow: one round of Task 2 levers on the recipe, judged on SELECT2"
    reports_command(commands, "levers", levers, _levers)
