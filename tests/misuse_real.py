"""Misuse and fault cases rerun on the real datasets, each as a user would type it.

`python tests/misuse_real.py` runs every case as a CLI subprocess against the real data
(`DATA_DIR`, default the shared folder) in throw-away stores, counts per class of fault the
tracebacks, the refusals slower than 30 s, the secrets printed, the runs left RUNNING and
the files overwritten, and writes `reports/reliability.md` and the table in
docs/reliability.md (between its markers). A case that breaks an expectation is listed as such.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "ann-numpy-array-images"
SECRET = "s3cr3t-pw"
TINY = ["--trials", "1", "--epochs", "1", "--final-epochs", "1", "--train-subset", "600"]
STUDY = ["search", "--step", "task2-step3", "--model", "vgg"]
DOC_START = "<!-- reliability table: written by `python tests/misuse_real.py` -->"
DOC_END = "<!-- end of reliability table -->"


@dataclass
class Tally:
    cases: int = 0
    tracebacks: int = 0
    slow: int = 0
    secrets: int = 0
    running: int = 0
    overwritten: int = 0
    broken: list[str] = field(default_factory=list)


TALLIES: dict[str, Tally] = {}


def cli(env: dict, *args: str, timeout: float = 600, background: bool = False):
    command = [sys.executable, "-m", "experiments", *args]
    if background:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def running_runs(store: Path) -> int:
    database = store / "mlflow.db"
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        try:
            return connection.execute(
                "SELECT count(*) FROM runs WHERE status='RUNNING'"
            ).fetchone()[0]
        except sqlite3.DatabaseError:
            return 0


def digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path).encode() + Path(path).read_bytes())
    return h.hexdigest()


def record(cls: str, name: str, rc: int, output: str, seconds: float, store: Path, *,
           expect_rc: int, needle: str = "", watched=(), before: str = "",
           bound: float = 30.0) -> None:  # fmt: skip
    tally = TALLIES.setdefault(cls, Tally())
    tally.cases += 1
    tally.tracebacks += "Traceback (most recent call last)" in output
    tally.slow += seconds > bound
    tally.secrets += SECRET in output
    tally.running += running_runs(store)
    tally.overwritten += bool(watched) and digest(watched) != before
    last = (output.strip().splitlines() or [""])[-1]
    if rc != expect_rc or (needle and needle not in output):
        tally.broken.append(f"{name}: exit {rc}, last line {last[:160]!r}")
    print(f"[{cls}] {name}: exit {rc} in {seconds:.1f} s; {last[:140]}", flush=True)


def env_for(tmp: Path, name: str, data: Path) -> tuple[dict, Path]:
    store = tmp / name / "mlruns"
    env = {**os.environ, "MLRUNS_DIR": str(store), "DATA_DIR": str(data),
           "CACHE_DIR": str(tmp / "cache"), "REPORTS_DIR": str(tmp / name / "reports"),
           "OMP_NUM_THREADS": "2"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    return env, store


def black_half_data(data: Path, root: Path) -> Path:
    """A datasets folder whose TEST holds only the real TEST's black-background images (a
    copy) beside links to the real TRAIN and TEST2: input the rules allow, that no Task 2
    step can use."""
    root.mkdir(parents=True)
    for name in ("TRAIN", "TEST2"):
        (root / name).symlink_to(data / name, target_is_directory=True)
    for source in sorted((data / "TEST").glob("*/*.npy")):
        x = np.load(source, allow_pickle=False).reshape(28, 28)
        ring = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]]).mean()
        if ring <= 0.5:  # the background rule: a black background
            target = root / "TEST" / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return root


def run_cases(data: Path, tmp: Path) -> None:
    env, store = env_for(tmp, "main", data)
    # 1. two launchers of one study
    first = cli(env, *STUDY, *TINY, background=True)
    lock = store / "locks"
    for _ in range(600):
        if lock.exists() and any(lock.iterdir()) and running_runs(store):
            break
        time.sleep(0.1)
    rc, out, s = cli(env, *STUDY, *TINY)
    first_out = first.communicate(timeout=900)[0]
    record("1 concurrent studies", "second search while the first runs", rc, out, s, store,
           expect_rc=2, needle="is being run by process")  # fmt: skip
    record("1 concurrent studies", "the first search", first.returncode, first_out, 0, store,
           expect_rc=0)  # fmt: skip
    # 2. resumed with another --set
    rc, out, s = cli(env, *STUDY, *TINY, "--set", "lr=0.5")
    record("2 resumed studies", "resume with --set lr=0.5", rc, out, s, store, expect_rc=2)
    # 8. settings validated before any run
    for setting in ("width=0", "dropout=1.5", "val_subset=5", f"seed={2**64}",
                    "val_fraction=0.999"):  # fmt: skip
        rc, out, s = cli(env, "train", "--step", "task2-step3", "--model", "vgg", "--set", setting)
        record("8 settings", f"train --set {setting}", rc, out, s, store, expect_rc=2)
    rc, out, s = cli(env, *STUDY, "--workers", "0")
    record("8 settings", "search --workers 0", rc, out, s, store, expect_rc=2)
    rc, out, s = cli(env, "train", "--step", "task2-step3", "--model", "vgg",
                     "--set", "lr=0.1", "--set", "lr=0.5")  # fmt: skip
    record("8 settings", "--set lr twice", rc, out, s, store, expect_rc=2, needle="twice")
    # 8. a TEST folder the Task 2 steps cannot use: the real TEST's black half alone
    black = black_half_data(data, tmp / "black-half-data")
    benv, bstore = env_for(tmp, "black-half", black)
    for args in (("train", "--step", "task2-step3", "--model", "vgg"),
                 ("search", "--step", "task2-step2", "--model", "vgg", *TINY)):  # fmt: skip
        rc, out, s = cli(benv, *args)
        record("8 settings", f"{args[0]} {args[2]} on TEST without its white half", rc, out, s,
               bstore, expect_rc=2, needle="has no white-background image")  # fmt: skip
    # 4. an unreachable tracking server with a password
    bad = {**env, "MLFLOW_TRACKING_URI": f"http://user:{SECRET}@127.0.0.1:9/"}
    for args in (("report",), ("promote",), (*STUDY, *TINY)):
        rc, out, s = cli(bad, *args)
        record("4 unreachable server", " ".join(args[:1]), rc, out, s, store, expect_rc=2,
               needle="is unreachable")  # fmt: skip
    rc, out, s = cli(env, *STUDY, *TINY, "--storage",
                     f"postgresql://u:{SECRET} x@127.0.0.1:1/db")  # fmt: skip
    record("4 unreachable server", "--storage with a spaced password", rc, out, s, store,
           expect_rc=2)  # fmt: skip
    # 5. the registry: only Task 2 studies, twice at once, then other data
    runs = [cli(env, "promote", background=True) for _ in range(2)]
    for proc in runs:
        out = proc.communicate(timeout=600)[0]
        record("5 registry", "two promotes at once", proc.returncode, out, 0, store,
               expect_rc=0, needle="skipped Task 1")  # fmt: skip
    with sqlite3.connect(store / "mlflow.db") as connection:
        versions = connection.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    if versions != 1:
        TALLIES["5 registry"].broken.append(f"{versions} versions after two promotes")
    other = tmp / "other-data"
    for name in ("TRAIN", "TEST", "TEST2"):
        shutil.copytree(data / name, other / name)
    (other / "TEST" / "1").rename(other / "TEST" / "tmp")
    (other / "TEST" / "2").rename(other / "TEST" / "1")
    (other / "TEST" / "tmp").rename(other / "TEST" / "2")
    rc, out, s = cli({**env, "DATA_DIR": str(other), "CACHE_DIR": str(tmp / "cache2")},
                     "promote", "--task", "2")  # fmt: skip
    record("5 registry", "promote on other data", rc, out, s, store, expect_rc=2,
           needle="was selected on", bound=120)  # fmt: skip
    # 3. the served model and 7. predict --out
    inputs = tmp / "inputs"
    inputs.mkdir()
    image = np.load(sorted((data / "TEST2" / "1").iterdir())[0])
    np.save(inputs / "=cmd.npy", image)
    np.save(inputs / "bytes.npy", (image * 255).astype(np.float32))
    watched = list(inputs.iterdir())
    before = digest(watched)
    model = "task2-step3/vgg"
    rc, out, s = cli(env, "predict", str(inputs / "bytes.npy"), "--model", model, "--out",
                     str(tmp / "p.csv"))  # fmt: skip
    record("3 served model", "8-bit values", rc, out, s, store, expect_rc=2)
    snippet = (
        "import numpy as np, mlflow\nfrom experiments.tracking import store\nstore.init()\n"
        "m = mlflow.pyfunc.load_model('models:/glyph-task2@champion')\n"
        "for x in (np.full((2,1,28,28), np.nan, np.float32), np.zeros((2,28,28,3), np.float32)):\n"
        "    try:\n        m.predict(x); print('ANSWERED')\n"
        "    except mlflow.exceptions.MlflowException as e:\n"
        "        print('refused', e.get_http_status_code())\n"
        "print('empty', len(m.predict(np.zeros((0,1,28,28), np.float32))))\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    out = done.stdout + done.stderr
    record("3 served model", "NaN, wrong shape, empty batch", done.returncode, out,
           time.monotonic() - start, store, expect_rc=0, needle="refused 400")  # fmt: skip
    if "ANSWERED" in out:
        TALLIES["3 served model"].broken.append("bad input answered")
    copy_data = {**env, "DATA_DIR": str(other), "CACHE_DIR": str(tmp / "cache2")}
    for target in (inputs / "=cmd.npy", other / "TEST2" / "1" / "out.csv", inputs):
        rc, out, s = cli(copy_data, "predict", str(inputs / "=cmd.npy"), "--model", model,
                         "--out", str(target))  # fmt: skip
        record("7 predict --out", f"--out {target.name}", rc, out, s, store, expect_rc=2,
               watched=watched, before=before)  # fmt: skip
    rc, out, s = cli(env, "predict", str(inputs / "=cmd.npy"), "--model", model, "--out",
                     str(tmp / "ok.csv"))  # fmt: skip
    text = (tmp / "ok.csv").read_text() if (tmp / "ok.csv").exists() else ""
    record("7 predict --out", "formula cell neutralised", rc, out, s, store, expect_rc=0,
           watched=watched, before=before)  # fmt: skip
    if ",=" in text or "\n=" in text:
        TALLIES["7 predict --out"].broken.append("a cell starts with =")
    # 10. code planted in the store
    marker = tmp / "planted-ran"
    for mlmodel in (store / "artifacts").rglob("MLmodel"):
        for rel in ("code/experiments/__init__.py", "data/model/sitecustomize.py", "x.py"):
            (mlmodel.parent / rel).parent.mkdir(parents=True, exist_ok=True)
            (mlmodel.parent / rel).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    rc, out, s = cli(env, "predict", str(inputs / "=cmd.npy"), "--out", str(tmp / "q.csv"))
    record("10 code in the store", "predict the champion with planted files", rc, out, s,
           store, expect_rc=2, needle="was changed after it was promoted")  # fmt: skip
    if marker.exists():
        TALLIES["10 code in the store"].broken.append("planted code ran")
    run_store_surface_cases(data, tmp, env, store, inputs)
    # 6. a copied store
    copy_env, copy = env_for(tmp, "copy", data)
    shutil.copytree(store, copy)
    original = digest(p for p in (store / "artifacts").rglob("*") if p.is_file())
    rc, out, s = cli(copy_env, "report")
    record("6 copied store", "report on the copy", rc, out, s, copy, expect_rc=2,
           needle="relocate")  # fmt: skip
    rc, out, s = cli(copy_env, "relocate")
    record("6 copied store", "relocate", rc, out, s, copy, expect_rc=0)
    rc, out, s = cli(copy_env, "report")
    record("6 copied store", "report after relocate", rc, out, s, copy, expect_rc=0, bound=300)
    if digest(p for p in (store / "artifacts").rglob("*") if p.is_file()) != original:
        TALLIES["6 copied store"].overwritten += 1
    # 9. store faults
    broken_env, broken = env_for(tmp, "broken", data)
    broken.mkdir(parents=True)
    (broken / "mlflow.db").write_bytes(b"garbage" * 1000)
    rc, out, s = cli(broken_env, "report")
    record("9 store faults", "damaged mlflow.db", rc, out, s, broken, expect_rc=2,
           needle="cannot be read")  # fmt: skip
    holder = sqlite3.connect(copy / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    rc, out, s = cli(copy_env, "report")
    holder.execute("ROLLBACK")
    holder.close()
    record("9 store faults", "locked mlflow.db", rc, out, s, copy, expect_rc=2, needle="locked")
    proc = cli(env, "train", "--step", "task2-step3", "--model", "vgg", background=True)
    time.sleep(25)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    record("9 store faults", "SIGTERM during train", proc.returncode, out, 0, store,
           expect_rc=143)  # fmt: skip
    journal = store / "optuna.journal"
    with journal.open("a") as handle:
        handle.write("{not json\n")
    rc, out, s = cli(env, *STUDY, *TINY)
    record("9 store faults", "damaged journal line", rc, out, s, store, expect_rc=2,
           needle=str(journal))  # fmt: skip


def run_store_surface_cases(data: Path, tmp: Path, env: dict, store: Path, inputs: Path) -> None:
    """The store's own files, URLs with secrets, tampered predictions, odd store paths and
    tracking URIs, a terminated search, a SQLite study storage shared by two launchers."""
    watched = [store / "mlflow.db", store / "optuna.journal"]
    before = digest(watched)
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    image = str(inputs / "=cmd.npy")
    for target in (*watched, fifo, Path("/dev/null")):
        rc, out, s = cli(env, "predict", image, "--model", "task2-step3/vgg", "--out", str(target))
        record(
            "11 predict --out onto the store",
            f"--out {target.name}",
            rc,
            out,
            s,
            store,
            expect_rc=2,
            watched=watched,
            before=before,
        )
    source = f"https://user:{SECRET}@127.0.0.1:9/repo.git"
    fetch_env = {**env, "GLYPH_DATA_SOURCE": source, "GLYPH_FETCH_TIMEOUT": "20"}
    done = subprocess.run(
        [sys.executable, "-m", "data_tools", "fetch", "--out", str(tmp / "fetched")],
        cwd=ROOT,
        env=fetch_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    record(
        "12 secrets in URLs",
        "fetch from a URL with a password",
        done.returncode,
        done.stdout + done.stderr,
        0,
        store,
        expect_rc=2,
    )
    for password in (f"p@{SECRET}", f"p%40{SECRET}"):
        odd = {**env, "MLFLOW_TRACKING_URI": f"postgresql://u:{password}@127.0.0.1:1/db"}
        rc, out, s = cli(odd, "report")
        record(
            "12 secrets in URLs",
            f"report on a store URL with {password[:3]}...",
            rc,
            out,
            s,
            store,
            expect_rc=2,
        )
    for uri in (str(tmp / "plain"), "file:///tmp/x", "mysql://u@127.0.0.1/db", "databricks"):
        rc, out, s = cli({**env, "MLFLOW_TRACKING_URI": uri}, "report")
        record(
            "13 unsupported stores",
            f"MLFLOW_TRACKING_URI={uri[:20]}",
            rc,
            out,
            s,
            store,
            expect_rc=2,
        )
    for name in ("a?b", "a%41b", "a#b"):
        rc, out, s = cli({**env, "MLRUNS_DIR": str(tmp / name)}, "report")
        record("13 unsupported stores", f"MLRUNS_DIR=.../{name}", rc, out, s, store, expect_rc=2)
    # a tampered predictions file is predicted again, never trusted
    for npz in (store / "artifacts").rglob("predictions*.npz"):
        with np.load(npz, allow_pickle=False) as held:
            fake = {k: np.full_like(v, 1.0 / v.shape[-1]) for k, v in held.items()}
        np.savez(npz, **fake)
    rc, out, s = cli(env, "promote", "--task", "2")
    record(
        "14 tampered predictions",
        "promote on tampered predictions files",
        rc,
        out,
        s,
        store,
        expect_rc=0,
        needle="predicted again",
        bound=300,
    )
    if "selection (validation) accuracy 1.0000" in out:
        TALLIES["14 tampered predictions"].broken.append("a tampered file was trusted")
    # the journal without its database, then the database back
    (store / "mlflow.db").rename(store / "mlflow.db.aside")
    rc, out, s = cli(env, *STUDY, *TINY)
    record(
        "15 journal without its database",
        "resume with mlflow.db moved aside",
        rc,
        out,
        s,
        store,
        expect_rc=2,
    )
    (store / "mlflow.db").unlink(missing_ok=True)
    (store / "mlflow.db.aside").rename(store / "mlflow.db")
    # a terminated search, and two launchers on one SQLite study storage
    proc = cli(env, "search", "--step", "task2-step3", "--model", "hybrid", background=True)
    time.sleep(20)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    record(
        "16 signals and locks",
        "SIGTERM during search",
        proc.returncode,
        out,
        0,
        store,
        expect_rc=143,
    )
    sqlite_env = {**env, "OPTUNA_STORAGE": f"sqlite:///{tmp / 'studies.db'}"}
    first = cli(
        sqlite_env, "search", "--step", "task2-step3", "--model", "efficientnet", background=True
    )
    time.sleep(15)
    rc, out, s = cli(
        sqlite_env, "search", "--step", "task2-step3", "--model", "efficientnet", *TINY
    )
    first.send_signal(signal.SIGTERM)
    first_out = first.communicate(timeout=300)[0]
    record(
        "16 signals and locks",
        "two searches on one SQLite storage",
        rc,
        out,
        s,
        store,
        expect_rc=2,
        needle="is being run by",
    )
    record(
        "16 signals and locks",
        "the first of them, terminated",
        first.returncode,
        first_out,
        0,
        store,
        expect_rc=143,
    )


def markdown(data: Path, seconds: float) -> str:
    from experiments.core.machine import describe_machine

    rows = [
        "| class | cases | tracebacks | refusals > 30 s | secrets printed | runs left "
        "RUNNING | files overwritten | not as expected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cls, t in TALLIES.items():
        rows.append(f"| {cls} | {t.cases} | {t.tracebacks} | {t.slow} | {t.secrets} | "
                    f"{t.running} | {t.overwritten} | {len(t.broken)} |")  # fmt: skip
    broken = [f"- {cls}: {b}" for cls, t in TALLIES.items() for b in t.broken]
    return "\n".join([
        f"Measured on {describe_machine()}, {time.strftime('%Y-%m-%d')}, on the datasets in "
        f"`{data.name}`, with `python tests/misuse_real.py` ({seconds / 60:.1f} min).",
        "", *rows, "", *(broken or ["Every case behaved as expected."]),
    ])  # fmt: skip


def main() -> int:
    sys.path.insert(0, str(ROOT))
    data = Path(os.environ.get("DATA_DIR") or REAL)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="misuse-") as tmp:
        run_cases(data, Path(tmp))
    table = markdown(data, time.monotonic() - start)
    reports = ROOT / "reports"
    (reports / "reliability.md").write_text(f"# Misuse and faults on the real data\n\n{table}\n")
    readme = ROOT / "docs" / "reliability.md"
    head, start_marker, rest = readme.read_text().partition(DOC_START)
    _, end_marker, tail = rest.partition(DOC_END)
    if start_marker and end_marker:
        readme.write_text(f"{head}{start_marker}\n{table}\n{end_marker}{tail}")
    print(table)
    return 0 if not any(t.broken for t in TALLIES.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
