"""The launcher's process: its lock on the study, termination signals, and its workers' lives.

- The study lock: one launcher per study, whatever its storage. A POSIX record lock on a file
  beside the storage (a journal or a SQLite file) or, for a database server, in a folder of
  this machine; it belongs to the process that took it, is released when that process ends,
  however it ends, and is never kept by a child it forks.
- SIGTERM (a `kill`, a scheduler, make stopping its jobs) ends a command as Ctrl-C does: the
  handler raises `Terminated`, a KeyboardInterrupt, so runs end KILLED and trials FAIL, never
  left RUNNING; the command exits with 128 + the signal's number (143 for SIGTERM).
- `--workers`: worker processes share the study's storage, are stopped with their launcher
  on SIGTERM, and die with it (a parent-death signal) when it is killed outright.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.core import config

if TYPE_CHECKING:
    from experiments.search.space import Budget


def is_rdb(url: str | None) -> bool:
    """An Optuna RDB storage (a URL) rather than a journal file."""
    return "://" in config.study_storage(url)


_HELD: set[str] = set()  # the study locks this process holds


def lock_path(name: str, storage_url: str | None) -> Path:
    """The lock file of study `name` in its storage: beside a journal or a SQLite file (every
    store using that file shares it), and for a database server in a folder of this machine
    keyed by the server's address (launchers on other machines: the trials' heartbeats)."""
    target = config.study_storage(storage_url)
    file_name = name.replace("/", "__") + ".lock"
    if not is_rdb(storage_url):
        return Path(target).expanduser().parent / "locks" / file_name
    if target.startswith("sqlite:///"):
        return Path(target[len("sqlite:///") :].split("?", 1)[0]).parent / "locks" / file_name
    digest = hashlib.sha256(target.encode()).hexdigest()[:16]  # the password never in a name
    folder = Path(tempfile.gettempdir()) / f"glyph-study-locks-{os.getuid()}"  # this user's
    return folder / f"{digest}__{file_name}"


def _lock_holder(handle) -> int | None:
    """The pid of the process holding a POSIX lock on `handle`'s file (0 for a process in
    another pid namespace), or None when none holds it."""
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    answer = fcntl.fcntl(handle, fcntl.F_GETLK, query)
    kind, _, _, _, pid = struct.unpack("hhqqi4x", answer)
    return None if kind == fcntl.F_UNLCK else pid


def _open_lock_file(path: Path):
    """The lock file, opened without following a symlink; its folder made for this user
    alone when it is new, and refused when another user owns it (a shared temporary folder
    must not let anyone plant a file or a link there)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = path.parent.stat().st_uid
    if owner != os.getuid():
        raise RuntimeError(f"{path.parent}: the study lock folder belongs to another user")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RuntimeError(f"{path}: the study lock file is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RuntimeError(f"{path}: the study lock file is not a regular file")
    return os.fdopen(fd, "a+")


@contextlib.contextmanager
def study_lock(name: str, storage_url: str | None) -> Iterator[None]:
    """Hold the study for this process, whatever its storage (an OS lock on a file beside it,
    released when the process ends, however it ends): a second launcher of the same study is
    refused in one line naming the process that holds it, instead of failing that process's
    live trial. Workers of one launcher (`--workers`) join through the launcher, not this lock.

    The lock is a POSIX record lock: owned by this process alone, so a child it forks never
    keeps it, and a dead holder's lock is taken over at once."""
    path = lock_path(name, storage_url)
    key = str(path.resolve())
    if key in _HELD:  # held by this very process (a second lock here would share the first)
        raise RuntimeError(
            f"study {name} is being run by process {os.getpid()} on {socket.gethostname()} "
            "(this process); wait for it to end"
        )
    handle = _open_lock_file(path)
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            pid = _lock_holder(handle)
            handle.seek(0)
            recorded = handle.read().strip()
            holder = f"process {pid} on {socket.gethostname()}" if pid else recorded
            raise RuntimeError(
                f"study {name} is being run by {holder or 'another process'}; wait for it to "
                "end, or stop it (an interrupted study resumes where it stopped)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        handle.close()  # closing releases the lock


INTERRUPTED = 128 + signal.SIGINT  # the status of a command stopped by Ctrl-C
_received: list[int] = []  # the termination signals this process has received


class Terminated(KeyboardInterrupt):
    """A termination signal turned into an interrupt; `exit_status` is 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
        self.exit_status = 128 + signum


def reset() -> None:
    """Forget received termination signals (a new command in the same process)."""
    _received.clear()


def terminated_handler(signum: int, frame) -> None:
    """A signal handler raising `Terminated`: `signal.signal(signal.SIGTERM, terminated_handler)`."""
    _received.append(signum)
    raise Terminated(signum)


def exit_status(exc: BaseException) -> int:
    """The exit status of a command stopped by `exc`: 128 + signal for `Terminated`, 130 for
    Ctrl-C."""
    return getattr(exc, "exit_status", INTERRUPTED)


def final_status(code: int) -> int:
    """A command's exit status with a received termination signal accounted for: a command that
    did not finish after SIGTERM exits 143 (also when the signal surfaced as another error)."""
    if code != 0 and _received:
        return 128 + _received[-1]
    return code


class _QuietInterrupt(logging.Filter):
    """Optuna logs a trial ended by Ctrl-C or SIGTERM as a failure with the KeyboardInterrupt's
    traceback; the interrupt itself is reported by the command line in one line, and the
    trial is still recorded FAIL and its run KILLED. This drops those two log records."""

    def __init__(self) -> None:
        super().__init__()
        self.dropping: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        message = str(record.msg)
        if info and isinstance(info[1], KeyboardInterrupt):
            self.dropping.add(message.split(" failed", 1)[0])  # "Trial <n>"
            return False
        head = message.split(" failed with value", 1)[0]
        if head in self.dropping:
            self.dropping.discard(head)
            return False
        return True


def quiet_interrupts() -> None:
    """Install `_QuietInterrupt` on Optuna's optimisation logger (once)."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _QuietInterrupt) for f in logger.filters):
        logger.addFilter(_QuietInterrupt())


def spawn_workers(
    entry: list[str],
    step: str,
    model: str,
    budget: Budget,
    storage_url: str | None,
    remaining: int,
    workers: int,
) -> None:
    """Split `remaining` trials over `workers` processes sharing the study storage; wait for all.

    `entry` is the command that starts one worker (the driver's), given its options here.
    """
    workers = min(workers, remaining)
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)  # a parallel job's share
    threads = max(1, cores // workers)
    quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # never override the parent
    if storage_url:
        env["OPTUNA_STORAGE"] = storage_url
    env[LAUNCHER_VARIABLE] = str(os.getpid())  # each worker dies with this process
    procs: list[subprocess.Popen] = []
    try:
        for index, quota in enumerate(quotas):
            options = {"--step": step, "--model": model, "--quota": quota, "--threads": threads}
            options |= {"--index": index, "--budget": json.dumps(asdict(budget))}
            command = [*entry, *(str(part) for pair in options.items() for part in pair)]
            print(
                f"[{step}/{model}] worker {index}: {quota} trials, {threads} thread(s)", flush=True
            )
            procs.append(subprocess.Popen(command, env=env))
        codes = [proc.wait() for proc in procs]
    except BaseException:  # SIGTERM or Ctrl-C of the launcher: its workers end their trials too
        stop_workers(procs)
        raise
    if any(codes):
        raise RuntimeError(f"study {step}/{model}: worker exit codes {codes}")


LAUNCHER_VARIABLE = "GLYPH_SEARCH_LAUNCHER"  # the pid of the process that started a worker
STOP_GRACE = 20.0  # seconds a worker has to end its trial's run after SIGTERM


def stop_workers(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """SIGTERM every live worker (each ends its trial FAIL and its run KILLED), then SIGKILL
    whichever is still alive after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """In a worker: be killed (SIGKILL) by the kernel when the launcher that started it dies,
    however it dies (kill -9 included), so that no worker goes on training for a study nobody
    holds; a resume then fails the dead workers' trials, never live ones. A worker whose
    launcher is already gone exits at once. Linux only; elsewhere the launcher's SIGTERM
    handling (`stop_workers`) is what ends them."""
    launcher = os.environ.get(LAUNCHER_VARIABLE)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != int(launcher):  # the launcher died before the death signal was set
        os._exit(128 + signal.SIGKILL)
