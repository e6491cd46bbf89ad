"""Issue 12's study-layer cases as CLI commands against one checkout of the code: one row each.

    git worktree add --detach /tmp/old 6808bd5
    .venv/bin/python tests/failures_before_after.py /tmp/old     # before
    .venv/bin/python tests/failures_before_after.py .            # after

Each case runs in a fresh store on tiny synthetic data (tests/synthetic.py). The
table (reports/reliability.md) records the exit status, whether a traceback was
printed, and what was left behind: a tracking database, runs (and RUNNING ones), a
study journal, cache entries.
"""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_study_data  # noqa: E402

code = Path(sys.argv[1]).resolve()

PY = sys.executable
B = ["--trials", "1", "--epochs", "1", "--train-subset", "0"]


def env_for(root: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(code),
        "DATA_DIR": str(root / "data"),
        "MLRUNS_DIR": str(root / "mlruns"),
        "CACHE_DIR": str(root / "cache"),
        "REPORTS_DIR": str(root / "reports"),
        "CI": "1",
    }


def fresh() -> Path:
    root = Path(tempfile.mkdtemp(prefix="v12-"))
    write_study_data(root / "data", per_class=20)
    return root


def made(root: Path) -> str:
    db = root / "mlruns" / "mlflow.db"
    things = []
    if db.exists():
        things.append("db")
        try:
            con = sqlite3.connect(db)
            status = [r[0] for r in con.execute("select status from runs")]
            if status:
                things.append(f"runs={len(status)}")
            if "RUNNING" in status:
                things.append(f"RUNNING={status.count('RUNNING')}")
        except sqlite3.Error:
            pass
    if (root / "mlruns" / "optuna.journal").exists():
        things.append("journal")
    if (root / "cache").exists() and any((root / "cache").iterdir()):
        things.append("cache")
    return ",".join(things) or "nothing"


def case(name: str, args: list[str], root: Path | None = None, timeout=300):
    root = root or fresh()
    p = subprocess.run(
        [PY, "-m", "experiments", *args],
        cwd=code,
        env=env_for(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    err = [x for x in p.stderr.splitlines() if "INFO mlflow" not in x and x.strip()]
    tb = any("Traceback" in x for x in err)
    last = (err[-1] if err else "")[:110]
    print(
        f"| {name} | {p.returncode} | {'yes' if tb else 'no'} | {len(err)} | {made(root)} | `{last}` |",
        flush=True,
    )
    return root, p


print(
    f"## {code}\n\n| case | exit | traceback | stderr lines | left behind | last stderr line |\n|---|---|---|---|---|---|"
)
ONLY_KILL = len(sys.argv) > 2  # a second argument: only the kill -9 case
if not ONLY_KILL:
    T = ["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "1"]
    S = ["search", "--step", "task2-step3", "--model", "vgg", *B, "--final-epochs", "1"]
    for s in ["lr=-1", "lr=inf", "label_smoothing=5", "device=cuda"]:
        case(f"train --set {s}", [*T, "--set", s])
    case("train --epochs 0", [*T[:-2], "--epochs", "0"])
    case("search --final-epochs -1", [*S[:-2], "--final-epochs", "-1"])
    case(
        "search --trials 0", ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "0"]
    )
    case("search --set lr=nan", [*S, "--set", "lr=nan"])
    root = fresh()
    bogus = root / "weights.pt"
    bogus.write_bytes(b"not a checkpoint\n")
    case("train --set init_from=<not a checkpoint>", [*T, "--set", f"init_from={bogus}"], root)
    case(
        "search --storage postgresql://...:1 (unreachable)",
        [*S, "--storage", "postgresql+psycopg://optuna:s3cret@127.0.0.1:1/studies"],
    )
    case(
        "search --storage sqlite:////nonexistent/folder/x.db",
        [*S, "--storage", "sqlite:////nonexistent/folder/optuna.db"],
    )
    case("report on an empty store", ["report", "--out", str(Path(tempfile.mkdtemp()) / "reports")])
    # secret in a query parameter
    root = fresh()
    root, p = case(
        "search --storage sqlite:///x.db?password=s3cret",
        [*S, "--storage", f"sqlite:///{root}/o.db?password=s3cret"],
        root,
    )
    con = sqlite3.connect(root / "mlruns" / "mlflow.db")
    leaks = [
        r
        for r in con.execute("select key, value from tags union all select key, value from params")
        if "s3cret" in str(r[1])
    ]
    print(
        f"|   s3cret in MLflow tags/params | {len(leaks)} rows: {[k for k, _ in leaks]} | | | | |"
    )
    models = list((root / "mlruns").rglob("*.pkl")) + list(
        (root / "mlruns").rglob("data/model.pth")
    )
    print(
        f"|   pickled model files in the store | {len(models)}: {sorted({m.name for m in models})} | | | | |"
    )
# kill -9 during the final, then resume
root = fresh()
cmd = [PY, "-m", "experiments", "search", "--step", "task2-step3", "--model", "vgg", *B]
proc = subprocess.Popen(
    [*cmd, "--final-epochs", "400", "--set", "patience=1000"],
    cwd=code,
    env=env_for(root),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
db = root / "mlruns" / "mlflow.db"
final = None
t0 = time.time()
while time.time() - t0 < 300 and final is None and proc.poll() is None:
    time.sleep(1)
    if db.exists():
        with contextlib.suppress(sqlite3.Error):
            final = (
                sqlite3.connect(db)
                .execute(
                    "select r.run_uuid from runs r join tags t on t.run_uuid=r.run_uuid where t.key='role' and t.value='final'"
                )
                .fetchone()
            )
time.sleep(2)
proc.send_signal(signal.SIGKILL)
proc.wait()
print(f"|   killed during final: final run seen={final is not None} | | | | {made(root)} | |")
case(
    "resume after kill -9 during the final",
    [*cmd[3:], "--final-epochs", "1", "--set", "patience=1000"],
    root,
)
