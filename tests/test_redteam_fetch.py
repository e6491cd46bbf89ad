"""`fetch` under misuse: secrets masked, output escaped, transports restricted, a silent
server bounded, SIGTERM stopping git's whole process group, symlinked datasets refused."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from synthetic import write_study_data

from data_tools import fetch
from data_tools.__main__ import main as data_main

ROOT = Path(__file__).resolve().parents[1]


def _repo(tmp_path: Path, name: str = "published") -> Path:
    """A git repository laid out as the published one, one image per class."""
    repo = write_study_data(tmp_path / name, per_class=1)
    _commit(repo)
    return repo


def _commit(repo: Path) -> None:
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)


def _fetch_process(source: str, out: Path, timeout: float, **env: str):
    """`python -m data_tools fetch` in a child process, bounded by `timeout` seconds."""
    return subprocess.run(
        [sys.executable, "-m", "data_tools", "fetch", "--out", str(out), "--source", source],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class SilentServer:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.held.append(connection)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        for connection in self.held:
            connection.close()
        self.sock.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def test_a_password_in_the_source_is_never_printed(tmp_path, capsys, monkeypatch):
    for source in (
        "https://user:s3cretPW@127.0.0.1:1/data.git",
        "https://user:s3c@retPW@127.0.0.1:1/data.git",  # a raw @ in the password
        "https://user:s3c%40retPW@127.0.0.1:1/data.git?token=tok3nPW",
    ):
        monkeypatch.setenv("GLYPH_DATA_SOURCE", source)
        assert data_main(["fetch", "--out", str(tmp_path / "raw")]) == 2
        out, err = capsys.readouterr()
        printed = out + err
        assert "retPW" not in printed and "s3c" not in printed and "tok3n" not in printed
        assert "user:***@127.0.0.1:1" in out and err.count("\n") == 1
        assert not (tmp_path / "raw").exists()


def test_text_from_the_source_is_printed_as_one_escaped_line(tmp_path, capsys):
    source = f"file://{tmp_path}/none\n\x1b[31mfetched TRAIN"
    assert data_main(["fetch", "--out", str(tmp_path / "raw"), "--source", source]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err
    assert all(line.startswith(("fetching ", "fetch: ")) for line in out.splitlines())
    assert err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("source", ["fd::3", "ext::sh -c true", "ftp://127.0.0.1/data.git"])
def test_a_remote_helper_or_another_transport_is_refused_quickly(tmp_path, source):
    start = time.monotonic()
    done = _fetch_process(source, tmp_path / "raw", timeout=20)
    assert time.monotonic() - start < 10
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and "not allowed" in done.stderr
    assert not (tmp_path / "raw").exists()


def test_a_server_that_never_answers_fails_in_bounded_time(tmp_path, silent_server):
    start = time.monotonic()
    done = _fetch_process(
        f"http://127.0.0.1:{silent_server.port}/data.git",
        tmp_path / "raw",
        timeout=30,
        GLYPH_FETCH_TIMEOUT="3",
    )
    assert time.monotonic() - start < 10
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "took longer than 3 s" in done.stderr
    assert "still waiting" in done.stdout  # a silent git still shows progress
    assert list(tmp_path.iterdir()) == []  # no scratch folder, no target


def test_the_clone_shows_git_progress(tmp_path, capsys):
    repo = _repo(tmp_path)
    raw = tmp_path / "out" / "raw"
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{repo}"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("fetch: ") for line in out.splitlines())
    assert sorted(p.name for p in raw.iterdir()) == ["TEST", "TEST2", "TRAIN"]


def _processes_with(marker: str) -> list[int]:
    """Pids whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_sigterm_during_fetch_stops_git_and_leaves_nothing(tmp_path, silent_server):
    marker = f"data-{uuid.uuid4().hex}.git"
    out = tmp_path / "data" / "raw"
    source = f"http://127.0.0.1:{silent_server.port}/{marker}"
    command = [sys.executable, "-m", "data_tools", "fetch", "--out", str(out), "--source", source]
    fetcher = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "GLYPH_FETCH_TIMEOUT": "60"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not [p for p in _processes_with(marker) if p != fetcher.pid]:
            assert time.monotonic() < deadline, "git never started"
            time.sleep(0.1)
        fetcher.send_signal(signal.SIGTERM)
        _, err = fetcher.communicate(timeout=15)
        assert fetcher.returncode != 0 and "Traceback" not in err
        deadline = time.monotonic() + 5
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with(marker) == []  # git and its helpers ended with the fetch
        assert list((tmp_path / "data").iterdir()) == []  # no scratch clone left behind
    finally:
        for pid in _processes_with(marker):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if fetcher.poll() is None:
            fetcher.kill()
            fetcher.wait()


def test_a_symlinked_dataset_folder_is_refused(tmp_path, capsys):
    outside = write_study_data(tmp_path / "outside", per_class=1)
    repo = write_study_data(tmp_path / "published", per_class=1)
    shutil.rmtree(repo / "TRAIN")
    (repo / "TRAIN").symlink_to(outside / "TRAIN")  # an absolute path outside the clone
    _commit(repo)
    raw = tmp_path / "out" / "raw"
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{repo}"]) == 2
    err = capsys.readouterr().err
    assert "TRAIN is a symlink" in err and err.count("\n") == 1
    assert not raw.exists() and list(raw.parent.iterdir()) == []

    inner = write_study_data(tmp_path / "inner", per_class=1)
    image = inner / "TEST" / "1" / "img_0.npy"
    image.unlink()
    image.symlink_to(outside / "TEST" / "1" / "img_0.npy")
    _commit(inner)
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{inner}"]) == 2
    err = capsys.readouterr().err
    assert "TEST/1/img_0.npy is a symlink" in err and err.count("\n") == 1
    assert not raw.exists()


def test_fetch_if_missing_fetches_only_when_no_datasets_folder_is_found(tmp_path):
    """`make reproduce`'s first data step: a found folder is left alone, none is fetched."""
    source = _repo(tmp_path).as_uri()
    present, target = tmp_path / "present", tmp_path / "raw"
    for name in ("TRAIN", "TEST", "TEST2"):
        (present / name).mkdir(parents=True)

    def fetch_if_missing(data_dir: Path, *out: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "data_tools", "fetch", "--if-missing", *out]
        return subprocess.run(
            [*command, "--source", source],
            cwd=ROOT,
            env={**os.environ, "DATA_DIR": str(data_dir)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = fetch_if_missing(present, "--out", str(target))
    assert done.returncode == 0 and "nothing fetched" in done.stdout and not target.exists()
    done = fetch_if_missing(tmp_path / "absent", "--out", str(target))
    assert done.returncode == 0, done.stderr
    assert {"TRAIN", "TEST", "TEST2"} <= {path.name for path in target.iterdir()}
    # DATA_DIR names a folder that is not there: the data go there, where `make data` looks
    done = fetch_if_missing(tmp_path / "named")
    assert done.returncode == 0, done.stderr
    assert {"TRAIN", "TEST", "TEST2"} <= {p.name for p in (tmp_path / "named").iterdir()}


def test_a_sigterm_while_git_starts_waits_until_its_group_can_be_stopped():
    """Between fork and exec a SIGTERM must neither kill the fetch outright nor interrupt
    Popen half-way: either would leave git running in its own group with nobody to stop it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    before = signal.getsignal(signal.SIGTERM)
    reached = False
    with fetch._sigterm_interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt), interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run: nothing raised inside the block
            reached = True
        assert reached
        with interrupts.held():  # acted on once
            pass
        with pytest.raises(KeyboardInterrupt):  # outside the block: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before
