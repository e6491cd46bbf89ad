"""Throw-away PostgreSQL and MLflow tracking servers on 127.0.0.1, for the scale-out test.

PostgreSQL comes from the system packages (installed with apt-get when absent
and running as root); its data directory is a temporary folder, it listens on
loopback only, and everything is stopped and deleted on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PASSWORD = "cluster-test-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
            check=True,
            env=env,
            capture_output=True,
        )
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when running as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Start PostgreSQL on 127.0.0.1; yield a URL per database (user postgres, with a password)."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found and cannot be installed here")
    workdir = Path(tempfile.mkdtemp(prefix="glyph-pg-"))
    workdir.chmod(0o755)
    data, sockets = workdir / "data", workdir / "sock"
    for folder in (data, sockets):
        folder.mkdir()
    pwfile = workdir / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        shutil.chown(sockets, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    log = workdir / "postgres.log"
    try:
        subprocess.run(
            _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
                          f"--pwfile={pwfile}"]),
            check=True, capture_output=True,
        )  # fmt: skip
        if os.geteuid() == 0:
            log.touch()
            shutil.chown(log, "postgres")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]),
            check=True, capture_output=True,
        )  # fmt: skip
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        for name in databases:
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
                check=True, capture_output=True, env=env,
            )  # fmt: skip
        yield {
            name: f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/{name}" for name in databases
        }
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 with a PostgreSQL backend; yield its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts), "--workers", "1",
    ]  # fmt: skip
    log = open(artifacts.parent / "mlflow-server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
