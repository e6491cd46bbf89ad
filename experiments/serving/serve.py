"""`make serve`: a registered model served over REST by MLflow's scoring server, checked first.

`serve(model_uri, host, port)` copies the model's files out of the project's store, checks
them (a registered version against the digests recorded when it was promoted; any model's
MLmodel must name this package's loader and carry no code: `predict.checked_local_model`),
and runs `mlflow models serve` on that checked copy with `--env-manager local` and
`MLFLOW_TRACKING_URI` set to the project's store. A plain `mlflow models serve -m
models:/...` trusts whatever the store holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.core import config
from experiments.serving.predict import checked_local_model
from experiments.tracking import store

DEFAULT_MODEL = "models:/glyph-task2@champion"


def serve_command(model_path: Path, host: str, port: int) -> list[str]:
    """The `mlflow models serve` command line for a checked local model folder."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    program = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *program,
        "models",
        "serve",
        "-m",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--env-manager",
        "local",
    ]


def serve_environment() -> dict[str, str]:
    """The server's environment: the project's store, and the venv's programs on PATH
    (MLflow starts its web server by name)."""
    bin_dir = os.path.dirname(sys.executable)
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": config.tracking_uri(),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def start_server(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the scoring server (its own process; stopped by `serve` on Ctrl-C)."""
    return subprocess.Popen(command, env=env)


def serve(model_uri: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 5001) -> int:
    """Check the model at `model_uri` and serve it until interrupted; the server's exit
    status. A model that fails the check is a ValueError (one line) and nothing starts."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: expected 1..65535")
    store.init()
    with tempfile.TemporaryDirectory(prefix="glyph-serve-") as scratch:
        try:
            local = checked_local_model(model_uri, Path(scratch))
        except ValueError:
            raise
        except Exception as exc:  # MLflow's errors for a missing model, run or alias
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{model_uri}: cannot be served ({first[:200]})") from None
        print(f"serving {model_uri} (files checked) at http://{host}:{port}", flush=True)
        server = start_server(serve_command(local, host, port), serve_environment())
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            try:
                return server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                return server.wait()
