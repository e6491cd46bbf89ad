"""Model commands: `predict`, `promote` and `serve`."""

from __future__ import annotations

import argparse
from pathlib import Path

CHAMPION_URI = "models:/glyph-task2@champion"


def _predict(args: argparse.Namespace) -> None:
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


def _serve(args: argparse.Namespace) -> None:
    from experiments.serving.serve import serve

    code = serve(args.model, args.host, args.port)
    if code not in (0, -2, -15, 130, 143):  # stopped by Ctrl-C or SIGTERM: a normal end
        raise RuntimeError(f"mlflow models serve exited with status {code}")


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve a registered model over HTTP after checking its files' digests"
    )
    serve.add_argument("--model", default=CHAMPION_URI, help=f"model URI (default {CHAMPION_URI})")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001)
    serve.set_defaults(func=_serve)


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="apply a trained model to new .npy files")
    predict.add_argument(
        "paths", nargs="+", help=".npy files, folders of them, or dataset folders (class folders)"
    )
    predict.add_argument(
        "--model",
        default=CHAMPION_URI,
        help=f"an MLflow model URI (default {CHAMPION_URI}; models:/NAME@ALIAS, runs:/ID/model), "
        "a run id, or STEP/MODEL",
    )
    predict.add_argument("--out", default="predictions.csv", help="CSV (default predictions.csv)")
    predict.set_defaults(func=_predict)


def _add_promote(commands) -> None:
    promote = commands.add_parser(
        "promote", help="register each task's champion (glyph-task1, glyph-task2) @champion"
    )
    promote.add_argument("--task", type=int, action="append", choices=[1, 2])
    promote.set_defaults(func=_promote)


def add_commands(commands) -> None:
    _add_predict(commands)
    _add_promote(commands)
    _add_serve(commands)
