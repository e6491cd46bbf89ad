"""Inspection commands: `ui` (MLflow), `dashboard` (Optuna), `store` and `relocate`."""

from __future__ import annotations

import argparse


def _relocate(args: argparse.Namespace) -> None:
    from experiments.core import config
    from experiments.tracking.relocate import relocate

    folder = config.store_dir()  # MLRUNS_DIR, or an explicit sqlite:/// database's folder
    changed = relocate(folder)
    if not changed:
        print(f"{folder}: every artifact location already lies inside it")
        return
    counts = ", ".join(f"{n} {table}" for table, n in changed.items())
    print(f"{folder}: artifact locations pointed into it ({counts})")


def _dashboard(args: argparse.Namespace) -> None:
    import optuna_dashboard

    from experiments.core import config
    from experiments.search.study import make_storage

    print(f"optuna-dashboard on {config.mask_secrets(config.study_storage(args.storage))}")
    print(f"open http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(make_storage(args.storage), host=args.host, port=args.port)


def _store(args: argparse.Namespace) -> None:
    """The tracking URI MLflow's own commands need (`MLFLOW_TRACKING_URI=$(... store --uri)`)."""
    from experiments.core import config

    if args.uri:
        print(config.tracking_uri())
        return
    print(f"MLFLOW_TRACKING_URI={config.mask_url(config.tracking_uri())}")
    print(f"OPTUNA_STORAGE={config.mask_secrets(config.study_storage())}")
    print(f"artifacts under {config.artifacts_dir()}")


def _ui(args: argparse.Namespace) -> None:
    """`mlflow ui` on the project's store (MLRUNS_DIR or MLFLOW_TRACKING_URI), replacing this
    process; a tracking server has its own UI, which is named instead."""
    import os
    import shutil
    import sys
    from pathlib import Path

    from experiments.core import config
    from experiments.tracking import store

    uri = store.init()  # the store as every command sees it: created, checked, migrated
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server: open {config.mask_url(uri)} in a browser")
        return
    mlflow = Path(sys.executable).with_name("mlflow")
    executable = str(mlflow) if mlflow.exists() else shutil.which("mlflow")
    if executable is None:
        raise RuntimeError("mlflow: no `mlflow` command beside this Python; run `make setup`")
    command = [executable, "ui", "--backend-store-uri", uri, "--host", args.host]
    command += ["--port", str(args.port), "--workers", "1"]
    command += ["--artifacts-destination", config.artifacts_dir().as_uri()]
    print(f"MLflow UI on {config.store_dir()}: http://{args.host}:{args.port} (Ctrl-C stops)")
    sys.stdout.flush()
    os.execv(executable, command)


def _add_dashboard(commands) -> None:
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard on the study storage")
    dashboard.add_argument("--storage", help="Optuna storage URL (default: the project's journal)")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(func=_dashboard)


def _add_ui(commands) -> None:
    ui = commands.add_parser("ui", help="serve the MLflow UI on the project's store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)


def _add_store(commands) -> None:
    store = commands.add_parser("store", help="where the tracking store and the studies live")
    store.add_argument("--uri", action="store_true", help="only the tracking URI, unmasked")
    store.set_defaults(func=_store)


def add_commands(commands) -> None:
    _add_ui(commands)
    _add_dashboard(commands)
    _add_store(commands)
    relocate = commands.add_parser(
        "relocate",
        help="after copying or moving the store (MLRUNS_DIR): point its experiments', runs' and "
        "models' artifact locations into it",
    )
    relocate.set_defaults(func=_relocate)
