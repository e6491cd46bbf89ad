"""`python -m experiments steps | train | search | report | shift | bench | ...`: the command line.

Errors a user can act on (bad data, unknown step, model or setting) print one
line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os

from data_tools.cli import run
from experiments.core.steps import STEPS
from models import MODELS

PROFILE_CHOICES = ["auto", "cpu", "gpu"]  # experiments.search.space.PROFILES (a test checks)


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def _steps(args: argparse.Namespace) -> None:
    if args.names:
        print(" ".join(STEPS))
        return
    for step in STEPS.values():
        evals = ", ".join(step.eval_sets)
        source = f" ({step.kind} of {step.source})" if step.source else ""
        print(
            f"{step.name:<13} train {step.train_set:<7} eval {evals:<11} {step.description}{source}"
        )
        print(f"{'':<13} labels read by training: {step.label_use}")


def _train(args: argparse.Namespace) -> None:
    from experiments.core.settings import parse_overrides
    from experiments.search.driver import train_once

    if args.data_dir:  # also where a transfer step's pretraining reads TRAIN
        os.environ["DATA_DIR"] = args.data_dir
    user: dict = parse_overrides(args.set or [])
    if args.epochs is not None:
        user["epochs"] = args.epochs
    if args.seed is not None:
        user["seed"] = args.seed
    step, outcome = train_once(args.step, args.model, user, args.data_dir)
    if step.name != args.step:
        print(f"{args.step} trains nothing: trained {step.name} ({', '.join(step.eval_sets)})")
    print(f"run {outcome.run_id} in experiment {step.name}")
    shown = ["best_val_acc", "best_epoch"] + [
        k for k in outcome.metrics if k.endswith("_acc") and k != "best_val_acc"
    ]
    for key in shown:
        print(f"  {key:<18} {outcome.metrics[key]:.4f}")


def _search(args: argparse.Namespace) -> None:
    from experiments.core.settings import parse_overrides
    from experiments.core.steps import training_step
    from experiments.reporting.report import row_text
    from experiments.search.configs import check_settings
    from experiments.search.driver import run_step
    from experiments.search.space import default_budget

    budget = default_budget(
        args.profile,
        trials=args.trials,
        epochs=args.epochs,
        timeout=args.timeout,
        train_subset=args.train_subset,
        final_epochs=args.final_epochs,
        seed=args.seed,
        score_trials=args.score_trials or None,
        overrides=parse_overrides(args.set or []),
    )
    models = args.model or list(MODELS)
    steps = list(dict.fromkeys(args.step))  # in the order given: a chain, sources first
    for name in steps:  # every study's settings are checked before the first one starts
        for model in models:
            check_settings(training_step(name), model, budget)
    for name in steps:  # one process: imports, data cache and threads are set up once
        for model in models:
            result = run_step(name, model, budget, storage_url=args.storage, workers=args.workers)
            _print_result(result)
        print(row_text(name), flush=True)


def _print_result(result) -> None:
    acc = {
        k: v for k, v in result.final_metrics.items() if k.endswith("_acc") and k != "best_val_acc"
    }
    shown = ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
    chosen = "no search" if result.best_trial < 0 else f"best trial {result.best_trial}"
    print(
        f"[{result.study_name}] {chosen} val acc {result.best_val_acc:.4f}; "
        f"final run {result.final_run_id}: {shown}",
        flush=True,
    )


def _worker(args: argparse.Namespace) -> None:
    from experiments.search.driver import worker_main
    from experiments.search.space import Budget

    worker_main(
        args.step,
        args.model,
        args.quota,
        args.threads,
        args.index,
        Budget(**json.loads(args.budget)),
    )


def _analyze(args: argparse.Namespace) -> None:
    from data_tools.analyze import analyze_folders
    from experiments.core import config
    from experiments.tracking.store import log_data_analysis

    summaries, written = analyze_folders(config.data_dir(), config.reports_dir(args.out))
    for path in written:
        print(f"wrote {path}")
    run_id = log_data_analysis(summaries, written)
    print(f"logged to MLflow run {run_id} (experiment data-analysis)")


def _shift(args: argparse.Namespace) -> None:
    from experiments.analysis.shift import run_shift
    from experiments.reporting.report import write_shift_report

    models = tuple(args.model or MODELS)
    results = run_shift(models, curve=not args.no_curve, adapt=not args.no_adapt)
    print(f"wrote {write_shift_report(args.out)}")
    for model, result in results.items():
        m = result.metrics
        aurocs = ", ".join(f"{k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("auroc_"))
        print(f"{model}: TEST acc {m['TEST_acc']:.3f}; AUROC {aurocs}")
        for name in ("max_softmax", "mahalanobis", "background"):
            print(
                f"  abstain by {name}: coverage {m[f'coverage_{name}']:.3f}, "
                f"accuracy on accepted {m[f'selective_acc_{name}']:.3f}"
            )
        curve = [
            f"k={k} {m[f'k{k}_TEST_rest_acc']:.3f}"
            for k in (1, 5, 20, 100)
            if f"k{k}_TEST_rest_acc" in m
        ]
        if curve:
            print(f"  with k TEST labels per class of the new script: {', '.join(curve)}")
        if "selftrain_TEST_acc" in m:
            print(
                f"  self-training on unlabelled TEST: TEST acc {m['selftrain_TEST_acc']:.3f} "
                f"(white half {m['TEST_white_acc']:.3f} -> {m['selftrain_white_acc']:.3f}); "
                f"k-means purity on the new script {m.get('kmeans_new_purity', float('nan')):.3f}"
            )


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from experiments.serving.predict import (
        check_out,
        predict_files,
        resolve_source,
        summary,
        write_csv,
    )

    check_out(Path(args.out), args.paths)  # before any model is loaded or image read
    frame, labels = predict_files(args.paths, resolve_source(args.model))
    write_csv(frame, Path(args.out))
    print(f"wrote {args.out}: {len(frame):,} predictions")
    numbers = summary(frame, labels)
    if numbers:
        line = f"accuracy {numbers['accuracy']:.4f} on {numbers['labelled']:,} labelled images"
        if "coverage" in numbers:
            line += (
                f"; coverage {numbers['coverage']:.4f}, "
                f"accuracy on answered {numbers['answered_accuracy']:.4f}"
            )
        print(line)


def _promote(args: argparse.Namespace) -> None:
    from experiments.serving.registry import ALIAS, promote
    from experiments.tracking import store

    store.init()  # an unreachable or broken store is its own error, not "no study"
    promoted = 0
    for task in args.task or (1, 2):
        try:
            champion, version, created = promote(task)
        except RuntimeError as exc:  # no finished study for this task's rule
            if args.task:  # asked for by name: an error
                raise
            print(f"skipped Task {task}: {exc}", flush=True)
            continue
        promoted += 1
        state = "new version" if created else "already registered"
        print(f"{champion.name} v{version} @{ALIAS} ({state}): {results_line(champion)}")
    if not promoted:
        raise RuntimeError("no task has a finished study to promote: run `make reproduce` first")


def results_line(champion) -> str:
    detector = ""
    if champion.detector:
        detector = f", detector {champion.detector['name']} > {champion.detector['threshold']:.4f}"
    runs = ", ".join(run_id[:12] for run_id in champion.run_ids)
    return (
        f"{champion.label} (run {runs}), selection (validation) accuracy "
        f"{champion.selection_acc:.4f}{detector}"
    )


def _report(args: argparse.Namespace) -> None:
    from experiments.reporting.report import build_report, row_text

    out, rows = build_report(args.out, ensemble_k=args.ensemble, tta=args.tta)
    for step in STEPS:
        print(row_text(step, rows))
    print(f"wrote {out / 'comparison.md'}, comparison.csv, comparison.png")
    if args.ensemble:
        print(f"ensembles: {out / 'ensembles.csv'} (members in comparison.md)")


def _dashboard(args: argparse.Namespace) -> None:
    import optuna_dashboard

    from experiments.core import config
    from experiments.search.study import make_storage

    print(f"optuna-dashboard on {config.mask_secrets(config.study_storage(args.storage))}")
    print(f"open http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(make_storage(args.storage), host=args.host, port=args.port)


def _bench(args: argparse.Namespace) -> None:
    from experiments.bench.run import run_bench

    run_bench(args.out, sections=args.only)


def _gpu_bench(args: argparse.Namespace) -> None:
    from experiments.bench.gpu import run_gpu_bench

    run_gpu_bench(args.out, tiny=args.tiny, reproduce_timeout=args.reproduce_timeout)


def _fidelity(args: argparse.Namespace) -> None:
    from experiments.search.fidelity import write_fidelity

    write_fidelity(args.out)


def _levers(args: argparse.Namespace) -> None:
    from experiments.analysis.levers import write_levers

    write_levers(args.out)


def _add_steps(commands) -> None:

    steps = commands.add_parser("steps", help="list the declared task steps")
    steps.add_argument("--names", action="store_true", help="only the names, on one line")
    steps.set_defaults(func=_steps)


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="train one model on one step and log the run to MLflow"
    )
    train.add_argument("--step", required=True, choices=list(STEPS))
    train.add_argument("--model", required=True, choices=list(MODELS))
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)"
    )
    train.add_argument("--data-dir", help="datasets folder (default: $DATA_DIR, data/raw, shared)")
    train.set_defaults(func=_train)


def _add_search(commands) -> None:
    search = commands.add_parser("search", help="run or resume the Optuna study of (step, model)")
    search.add_argument(
        "--step",
        required=True,
        action="append",
        choices=list(STEPS),
        help="repeatable: the steps' studies run in this order in one process (a chain)",
    )
    search.add_argument(
        "--model",
        action="append",
        choices=list(MODELS),
        help="repeatable: one study per model (default: every registered model)",
    )
    search.add_argument(
        "--trials", type=int, help="finished trials the study should hold (default 5)"
    )
    search.add_argument(
        "--epochs",
        type=int,
        help="epochs per trial (default: Budget.trial_images' worth, 2..20; experiments/search/space.py)",
    )
    search.add_argument(
        "--train-subset", type=int, help="training images per trial, 0 = all (default 4000)"
    )
    search.add_argument(
        "--final-epochs",
        type=int,
        help="epochs of the best trial's retrain (default: Budget.final_images' worth, capped)",
    )
    search.add_argument(
        "--profile",
        choices=PROFILE_CHOICES,
        default="auto",
        help="the default budget: cpu (sized for make reproduce on a 2-core CPU), gpu (about 5x "
        "the images per study); auto: gpu where the run's device is CUDA (default auto)",
    )
    search.add_argument("--timeout", type=float, help="stop starting new trials after S seconds")
    search.add_argument("--seed", type=int, help="sampler and training seed (default 0)")
    search.add_argument(
        "--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE or mlruns/optuna.journal)"
    )
    search.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="fixed setting for every trial"
    )
    search.add_argument(
        "--workers", type=_at_least_one, default=1, help="processes sharing the study (default 1)"
    )
    search.add_argument(
        "--score-trials",
        action="store_true",
        help="also score every trial on the evaluation sets (analysis only)",
    )
    search.set_defaults(func=_search)


def _add_worker(commands) -> None:
    worker = commands.add_parser(
        "worker", help="(internal) one search worker, started by search --workers"
    )
    worker.add_argument("--step", required=True, choices=list(STEPS))
    worker.add_argument("--model", required=True, choices=list(MODELS))
    worker.add_argument("--quota", type=int, required=True)
    worker.add_argument("--threads", type=int, default=1)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--budget", required=True, help="the launcher's Budget as JSON")
    worker.set_defaults(func=_worker)


def _reports_command(commands, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """A subcommand whose only option is the reports folder it writes into."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--out", help="reports folder (default: reports/)")
    command.set_defaults(func=func)
    return command


def _add_analyze(commands) -> None:
    help_text = "data figures and data_summary.md, logged as a data-analysis MLflow run"
    _reports_command(commands, "analyze", help_text, _analyze)


def _add_shift(commands) -> None:
    shift = commands.add_parser(
        "shift", help="Task 1: new-script detectors and selective prediction"
    )
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


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="apply a trained model to new .npy files")
    predict.add_argument(
        "paths", nargs="+", help=".npy files, folders of them, or dataset folders (class folders)"
    )
    predict.add_argument(
        "--model",
        default="models:/glyph-task2@champion",
        help="an MLflow model URI (default models:/glyph-task2@champion; models:/NAME@ALIAS, "
        "runs:/ID/model), a run id, or STEP/MODEL",
    )
    predict.add_argument("--out", default="predictions.csv", help="CSV (default predictions.csv)")
    predict.set_defaults(func=_predict)


def _add_promote(commands) -> None:
    promote = commands.add_parser(
        "promote", help="register each task's champion (glyph-task1, glyph-task2) @champion"
    )
    promote.add_argument("--task", type=int, action="append", choices=[1, 2])
    promote.set_defaults(func=_promote)


def _relocate(args: argparse.Namespace) -> None:
    from experiments.core import config
    from experiments.tracking.relocate import relocate

    changed = relocate(config.mlruns_dir())
    if not changed:
        print(f"{config.mlruns_dir()}: every artifact location already lies inside it")
        return
    counts = ", ".join(f"{n} {table}" for table, n in changed.items())
    print(f"{config.mlruns_dir()}: artifact locations pointed into it ({counts})")


def _add_relocate(commands) -> None:
    relocate = commands.add_parser(
        "relocate",
        help="after copying or moving the store (MLRUNS_DIR): point its experiments', runs' and "
        "models' artifact locations into it",
    )
    relocate.set_defaults(func=_relocate)


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


def _add_dashboard(commands) -> None:
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard on the study storage")
    dashboard.add_argument("--storage", help="Optuna storage URL (default: the project's journal)")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(func=_dashboard)


def _add_bench(commands) -> None:
    from experiments.bench.run import SECTIONS

    bench = commands.add_parser(
        "bench", help="speed measured side by side in one run, into reports/bench.md"
    )
    bench.add_argument("--out", help="reports folder (default: reports/)")
    bench.add_argument(
        "--only",
        action="append",
        choices=list(SECTIONS),
        help="repeatable: run only these sections (predict: prediction batch 1,024 vs the "
        "default, logits compared; depthwise: EfficientNet's depthwise weight gradient, oneDNN "
        "vs batched matmul; compile: torch.compile vs eager, compile time included; study: one whole study by a "
        "baseline commit and by this tree, utilisation side by side, BENCH_BASELINE=ref)",
    )
    bench.set_defaults(func=_bench)


def _add_gpu_bench(commands) -> None:
    gpu = commands.add_parser(
        "gpu-bench", help="training images/s per model, make reproduce PROFILE=gpu, GPU use"
    )
    gpu.add_argument("--out", help="reports folder (default: reports/); appends to gpu.md")
    gpu.add_argument(
        "--tiny", action="store_true", help="a few images and `make -n reproduce`, for a CPU"
    )
    gpu.add_argument(
        "--reproduce-timeout",
        type=float,
        default=300.0,
        help="stop make reproduce after S seconds (default 300)",
    )
    gpu.set_defaults(func=_gpu_bench)


def _add_fidelity(commands) -> None:
    help_text = "slow: trial-score vs final-score rank correlation per trial fidelity"
    _reports_command(commands, "fidelity", help_text, _fidelity)


def _add_levers(commands) -> None:
    help_text = "slow: one round of Task 2 levers on the recipe, judged on SELECT2"
    _reports_command(commands, "levers", help_text, _levers)


SUBCOMMANDS = (
    _add_steps,
    _add_train,
    _add_search,
    _add_worker,
    _add_analyze,
    _add_shift,
    _add_predict,
    _add_promote,
    _add_relocate,
    _add_report,
    _add_dashboard,
    _add_bench,
    _add_gpu_bench,
    _add_fidelity,
    _add_levers,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one builder per subcommand (`SUBCOMMANDS`)."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def _terminated(signum: int, frame) -> None:
    """SIGTERM (a `kill`, a scheduler, make stopping its jobs) ends runs as Ctrl-C does:
    KILLED and tagged interrupted, never left RUNNING."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import signal

    from experiments.core.config import mask_secrets

    signal.signal(signal.SIGTERM, _terminated)
    _quiet_store_errors()
    return run(build_parser(), argv, redact=mask_secrets, explain=store_fault)


def _quiet_store_errors() -> None:
    """MLflow logs a traceback for a database error before raising it; `store_fault` turns the
    raised error into one line, so the logged traceback is dropped (GLYPH_TRACEBACK=1 keeps
    it)."""
    import logging

    if os.environ.get("GLYPH_TRACEBACK") == "1":
        return
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropDatabaseErrors) for f in logger.filters):
        logger.addFilter(_DropDatabaseErrors())


class _DropDatabaseErrors:
    def filter(self, record) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


def store_fault(exc: BaseException) -> str | None:
    """One line for a tracking store that is damaged or locked (a SQLite or SQLAlchemy error
    anywhere in the exception's chain), naming the database; None for anything else."""
    import sqlite3

    from experiments.core import config

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.Error) or type(exc).__module__ == "sqlalchemy.exc":
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
            uri = config.tracking_uri()
            where = (
                uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else config.mask_url(uri)
            )
            if "locked" in reason or "busy" in reason:
                return (
                    f"tracking store {where} is locked by another process ({reason}); wait "
                    "for it to finish, or stop it, then rerun"
                )
            return (
                f"tracking store {where} cannot be read as an MLflow store ({reason}); restore "
                "it from a copy, or move it aside to start a new store"
            )
        exc = exc.__cause__ or exc.__context__
    return None
