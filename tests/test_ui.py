"""The inspection surface a newcomer opens first: `make ui` shows the project's store, and every
command the Makefile names exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_python_command_the_makefile_embeds_exists():
    """Each `-c` snippet runs, each `-m` module imports, and each `-m experiments <command>`
    is a subcommand of the parser (a moved module once broke `make ui` this way)."""
    from experiments.cli import build_parser

    snippets = re.findall(r"\$\((?:PY|REGISTRY_PY)\) -c '([^']*)'", MAKEFILE)
    for snippet in snippets:
        done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
        assert done.returncode == 0, (snippet, done.stderr)
    modules = set(re.findall(r"\$\((?:PY|REGISTRY_PY)\) -m ([\w.]+)", MAKEFILE))
    assert {"experiments", "models", "data_tools", "pytest"} <= modules
    for module in modules:
        done = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; assert u.find_spec({module!r})"],
            capture_output=True,
        )
        assert done.returncode == 0, f"the Makefile runs -m {module}, which is not importable"
    commands = set(re.findall(r"-m experiments ([a-z][\w-]*)", MAKEFILE))
    known = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"ui", "dashboard", "serve", "search", "report", "promote"} <= commands
    assert commands <= known, commands - known


def _experiment_names(port: int, deadline: float) -> list[str]:
    """The experiments the UI's server lists over MLflow's REST API, once it answers."""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=100"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return [e["name"] for e in json.load(answer).get("experiments", [])]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_ui_lists_the_study_experiments_of_the_project_store(tmp_path):
    """`make ui` with MLRUNS_DIR on a tiny store: the server lists that store's experiments
    over the REST API, and no stray `mlflow.db` appears where make was started."""
    from experiments.tracking import store

    store.init()
    for name in ("task1-step1", "task2-step3"):
        store.experiment_id(name)
    stamp = tmp_path / "stamp"
    stamp.touch()
    port = _free_port()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    command = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(ROOT), "ui"]
    command += [f"UI_PORT={port}", f"PY={sys.executable}", f"STAMP={stamp}"]
    server = subprocess.Popen(
        command,
        cwd=workdir,
        env={**os.environ, "MLRUNS_DIR": str(tmp_path / "mlruns")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        names = _experiment_names(port, time.monotonic() + 90)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    assert {"task1-step1", "task2-step3"} <= set(names), output
    assert "Traceback" not in output
    assert f"http://127.0.0.1:{port}" in output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    assert not (ROOT / "mlflow.db").exists()
