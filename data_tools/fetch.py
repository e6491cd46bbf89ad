"""Getting the data: the published datasets, fetched once into `data/raw`, and their fingerprints.

The datasets are published with the original study at
github.com/stDem/ANN-numpy-array-images (folders TRAIN, TEST, TEST2 of `.npy` files).
`python -m data_tools fetch` clones that repository (or `GLYPH_DATA_SOURCE`: a `file`,
`http`, `https`, `ssh` or `git` URL, or a local path; remote helpers such as `fd::` or
`ext::` are refused) into a scratch folder beside the target and moves its three folders
into place in one rename: it never overwrites, and nothing half-fetched is left behind.

The clone is bounded: git gives up on a transfer slower than 1,000 bytes/s for 20 s, and
the whole clone on `GLYPH_FETCH_TIMEOUT` seconds (default 900). Git's progress is relayed
as lines on stdout, and a line every 10 s says it is still waiting when git is silent.
Git runs in its own process group, which is stopped on SIGTERM or Ctrl-C. Every URL that
is printed has its password and secret-looking query values masked, and text from the
source or from git is printed as one escaped line. A source whose TRAIN, TEST or TEST2 is
a symlink, or holds one, is refused. `EXPECTED_FINGERPRINTS` are those of the published
data, so `make data` can say when results will not be comparable with the committed
reports.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from data_tools.cli import one_line
from data_tools.reader import DatasetError

SOURCE = "https://github.com/stDem/ANN-numpy-array-images.git"
SPLIT_NAMES = ("TRAIN", "TEST", "TEST2")
EXPECTED_FINGERPRINTS = {  # sha256 of each published set's images and labels (Dataset.fingerprint)
    "TRAIN": "e5885453009be54fdbdc56841ac972fa9d579dc46910a7abef4254416d3d28d9",
    "TEST": "de6e79aa8a45ea59843f327bfdcc5f10bff871b1e3a7162e9dd0434fa0594780",
    "TEST2": "989ae2a1d4301fae53cfae3f4eb6161a8359815f6a7e41df860a3bb9ee26befc",
}
HOW_TO_GET = (
    f"get the datasets with `python -m data_tools fetch` (from {SOURCE.removesuffix('.git')}) "
    "or point DATA_DIR at a folder holding TRAIN, TEST and TEST2"
)
PROTOCOLS = ("file", "http", "https", "ssh", "git")  # git's GIT_ALLOW_PROTOCOL for the clone
TIMEOUT = 900.0  # seconds for the whole clone; GLYPH_FETCH_TIMEOUT overrides
LOW_SPEED_LIMIT = 1000  # bytes/s: a slower transfer ...
LOW_SPEED_TIME = 20  # ... for this many seconds is given up (http, https)
QUIET_INTERVAL = 10.0  # seconds of silence between two "still waiting" lines (a third of
# the time limit when that is shorter)
PROGRESS_INTERVAL = 2.0  # at most one relayed progress line per phase in this many seconds
STOP_GRACE = 5.0  # seconds git's process group has to end after SIGTERM before SIGKILL
SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "auth", "sig")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def source_url(override: str | None = None) -> str:
    return override or os.environ.get("GLYPH_DATA_SOURCE", "").strip() or SOURCE


def mask_url(url: str) -> str:
    """`url` with its credentials and secret-looking query values replaced by `***`: a
    password (`user:***@`), a user name alone unless the scheme is ssh (tokens are passed as
    user names), and query parameters named like a secret. The credentials are taken to end
    at the last `@`, so a raw `@` inside a password is hidden too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        credentials, _, after = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        if colon:
            rest = f"{user}:***@{after}"
        elif "ssh" not in scheme.lower():
            rest = f"***@{after}"
    return f"{scheme}://{mask_query(rest)}"


def mask_query(rest: str, secret_keys: tuple[str, ...] = SECRET_KEYS) -> str:
    """`host/path?query` with every password-like query value (by its key) as `***`."""
    location, question, query = rest.partition("?")
    if question:
        pairs = [
            (key, "***" if any(word in key.lower() for word in secret_keys) else value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    return f"{location}{question}{query}"


def mask_secrets(text: str) -> str:
    """`text` with every URL in it masked (`mask_url`)."""
    return _URL.sub(lambda match: mask_url(match.group(0)), text)


def shown(text: str) -> str:
    """Text from a source or from git as it may be printed: URLs masked, one escaped line."""
    return one_line(mask_secrets(text))


def check_source(url: str) -> None:
    """Refuse (DatasetError, one line) a source git would reach through anything but the
    allowed transports: a remote helper (`fd::`, `ext::`), another scheme, an option."""
    if not url or url.startswith("-"):
        raise DatasetError(shown(url) or "''", "is not a URL git can clone")
    scheme, sep, _ = url.partition("://")
    if sep:
        allowed = {p for p in PROTOCOLS} | {"git+ssh", "ssh+git"}
        if scheme.lower() not in allowed:
            raise DatasetError(
                mask_url(url),
                f"the {scheme!r} transport is not allowed (use {', '.join(PROTOCOLS)})",
            )
        return
    helper, sep, _ = url.partition("::")
    if sep and "/" not in helper:
        raise DatasetError(
            mask_url(url), f"remote helper {helper!r} is not allowed (use {', '.join(PROTOCOLS)})"
        )


def fetch_timeout() -> float:
    """The whole clone's time limit: `GLYPH_FETCH_TIMEOUT` seconds, else `TIMEOUT`."""
    value = os.environ.get("GLYPH_FETCH_TIMEOUT", "").strip()
    if not value:
        return TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise DatasetError("GLYPH_FETCH_TIMEOUT", f"{one_line(value)!r} is not a number of seconds")
    return seconds


def git_environment() -> dict[str, str]:
    """git's environment: only the allowed transports, no prompt for credentials."""
    env = {**os.environ, "GIT_ALLOW_PROTOCOL": ":".join(PROTOCOLS), "GIT_TERMINAL_PROMPT": "0"}
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=30")
    return env


def fetch(
    target: Path,
    source: str | None = None,
    timeout: float | None = None,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Path:
    """Clone `source` and move its TRAIN, TEST and TEST2 into `target` (new or empty).
    Progress goes to `say`, one line at a time; failures are one-line DatasetErrors."""
    url = source_url(source)
    check_source(url)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(target, "already exists and is not empty; fetch never overwrites")
    if shutil.which("git") is None:
        raise DatasetError(target, "fetching needs git on the PATH")
    limit = fetch_timeout() if timeout is None else timeout
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        clone = Path(scratch) / "clone"
        _clone(url, clone, target, limit, say)
        _check_layout(url, clone, target)
        staged = Path(scratch) / "raw"
        staged.mkdir()
        for name in SPLIT_NAMES:
            (clone / name).rename(staged / name)
        if target.exists():
            target.rmdir()  # empty, checked above
        staged.rename(target)  # one rename: all three folders appear together
    return target


def _clone(url: str, clone: Path, target: Path, limit: float, say: Callable[[str], None]) -> None:
    """Run `git clone` in its own process group, bounded by `limit` seconds; the group is
    stopped when this returns or raises (SIGTERM and Ctrl-C included)."""
    low_speed_time = max(1, min(LOW_SPEED_TIME, int(limit)))
    command = [
        "git",
        "-c",
        f"http.lowSpeedLimit={LOW_SPEED_LIMIT}",
        "-c",
        f"http.lowSpeedTime={low_speed_time}",
        "clone",
        "--depth",
        "1",
        "--progress",
        "--no-recurse-submodules",
        "--",
        url,
        str(clone),
    ]
    relay = _Relay(say)
    process = reader = None
    with _sigterm_interrupts() as interrupts:
        try:
            with interrupts.held():  # a SIGTERM while git starts acts once its group is known
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=git_environment(),
                    start_new_session=True,  # its own group: stopped as a whole
                )
                reader = threading.Thread(target=relay.read, args=(process.stderr,), daemon=True)
                reader.start()
            start = time.monotonic()
            quiet_since = start
            quiet_interval = min(QUIET_INTERVAL, limit / 3)
            while process.poll() is None:
                now = time.monotonic()
                if now - start > limit:
                    raise DatasetError(
                        target, f"cloning {mask_url(url)} took longer than {limit:g} s; stopped"
                    )
                if relay.last_output > quiet_since:
                    quiet_since = relay.last_output
                if now - quiet_since >= quiet_interval:
                    say(f"fetch: still waiting for {shown(url)} ({now - start:.0f} s)")
                    quiet_since = now
                time.sleep(0.1)
        finally:
            if process is not None:
                _stop_group(process)
            if reader is not None:
                reader.join(timeout=STOP_GRACE)
    if process.returncode != 0:
        reason = relay.reason or "git failed"
        raise DatasetError(target, f"cannot clone {mask_url(url)} ({reason})")


class _Relay:
    """git's stderr, read line by line (`\r` or `\n`): progress relayed to `say` at most
    once per phase every PROGRESS_INTERVAL seconds, the last error kept for the message."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.reason = ""
        self.last_output = 0.0
        self._failed = False  # a `fatal:` or `error:` line is kept over any later line
        self._shown: dict[str, float] = {}

    def read(self, stream) -> None:
        buffer = b""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            for line in lines:
                self._line(line.decode("utf-8", "replace").strip())
        self._line(buffer.decode("utf-8", "replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        now = time.monotonic()
        self.last_output = now
        if line.lower().startswith(("fatal:", "error:")):
            self.reason, self._failed = shown(line)[:300], True
        elif not self._failed:
            self.reason = shown(line)[:300]
        phase = line.split(":", 1)[0]
        done = "100%" in line or "done" in line
        if done or now - self._shown.get(phase, -PROGRESS_INTERVAL) >= PROGRESS_INTERVAL:
            self._shown[phase] = now
            self.say(f"fetch: {shown(line)[:200]}")


def _stop_group(process: subprocess.Popen) -> None:
    """End git's whole process group (SIGTERM, then SIGKILL after STOP_GRACE seconds)."""
    if process.poll() is None:
        for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


class _sigterm_interrupts:
    """While active (main thread only), SIGTERM raises KeyboardInterrupt, so the clone's
    process group is stopped and its scratch folder removed as for Ctrl-C."""

    def __enter__(self):
        self.previous = None
        self.holding = self.held_signal = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._interrupt)
        return self

    def _interrupt(self, signum, frame):
        if self.holding:  # inside `held()`: raised when the block ends
            self.held_signal = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """A SIGTERM inside this block is raised as KeyboardInterrupt when the block ends, not
        while a child process is half started (its group would then have nobody to stop it)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.held_signal:
            self.held_signal = False
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _check_layout(url: str, clone: Path, target: Path) -> None:
    """The clone holds TRAIN, TEST and TEST2 as real folders with no symlink inside."""
    for name in SPLIT_NAMES:
        path = clone / name
        if path.is_symlink():
            raise DatasetError(
                target,
                f"{mask_url(url)}: {name} is a symlink (to {os.readlink(path)}); refusing it",
            )
    missing = [name for name in SPLIT_NAMES if not (clone / name).is_dir()]
    if missing:
        raise DatasetError(target, f"{mask_url(url)} has no {', '.join(missing)} folder")
    for name in SPLIT_NAMES:
        for root, dirs, files in os.walk(clone / name):
            for entry in dirs + files:
                path = Path(root) / entry
                if path.is_symlink():
                    inside = path.relative_to(clone).as_posix()
                    raise DatasetError(
                        target, f"{mask_url(url)}: {inside} is a symlink; refusing it"
                    )


def fingerprint_notes(fingerprints: dict[str, str]) -> list[str]:
    """One line per set whose fingerprint differs from the published data's."""
    return [
        f"{name}: fingerprint {value[:12]} differs from the published data's "
        f"({EXPECTED_FINGERPRINTS[name][:12]}): results will not be comparable with reports/"
        for name, value in fingerprints.items()
        if name in EXPECTED_FINGERPRINTS and value != EXPECTED_FINGERPRINTS[name]
    ]
