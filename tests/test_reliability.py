"""Reliability: failing trials, kill -9 and resume, parallel workers, secrets, hostile data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from conftest import runs_in
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from synthetic import write_dataset

from data_tools import DatasetError, load_dataset
from experiments.core import config
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.search.study import ensure_parent_run, load_or_create_study, make_storage
from experiments.tracking import store

TINY = dict(trials=3, epochs=2, train_subset=0, final_epochs=1, warmup_epochs=0)


def _trial_runs(step: str) -> dict:
    return {r.info.run_id: r for r in runs_in(step, "tags.role = 'trial'")}


def test_a_failing_trial_is_recorded_and_the_study_goes_on(study_data, monkeypatch):
    import experiments.training.runner as runner

    real_fit = runner.fit
    calls = []

    def flaky_fit(cfg, *args, **kwargs):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise FloatingPointError("training loss is nan (diverged)")
        return real_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "fit", flaky_fit)
    run_step("task2-step3", "vgg", Budget(**TINY), final=False)
    study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 3
    failed = [r for r in _trial_runs("task2-step3").values() if r.data.tags["state"] == "FAIL"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "diverged" in failed[0].data.tags["fail_reason"]


def test_every_trial_failing_stops_with_a_clear_error(study_data, monkeypatch):
    import experiments.training.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "fit", broken)
    with pytest.raises(RuntimeError, match="trials failed in a row"):
        run_step("task2-step3", "resnet", Budget(**TINY), final=False)


def _search_command(trials: int, epochs: int, workers: int = 1, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "experiments", "search", "--step", "task2-step3", "--model", "vgg",
        "--trials", str(trials), "--epochs", str(epochs), "--train-subset", "0", "--final-epochs", "1",
        "--workers", str(workers), *extra,
    ]  # fmt: skip


def test_kill_9_then_resume_finishes_the_requested_trials(study_data):
    env = {**os.environ, "CI": "1"}
    # a long first trial (no early stopping), so the kill lands inside it
    long_trials = _search_command(3, 400, 1, "--set", "patience=1000")
    proc = subprocess.Popen(
        long_trials, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    storage = config.study_storage()
    running = None
    deadline = time.time() + 120
    while time.time() < deadline and running is None:
        time.sleep(0.5)
        if not os.path.exists(storage):
            continue
        try:
            study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
        except KeyError:
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "mlflow_run_id" in trial.user_attrs:
                running = trial
    assert running is not None, "no trial started in time"
    time.sleep(1.0)  # inside the trial's epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    resumed = subprocess.run(  # the same fixed settings: a study never resumes with others
        _search_command(3, 2, 1, "--set", "patience=1000"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"marked interrupted trials [{running.number}] as FAIL" in resumed.stdout
    study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
    assert study.trials[running.number].state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    store.init()
    killed = MlflowClient().get_run(running.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["interrupted"] == "true"
    # the report never counts it: its cell comes from a COMPLETE final run
    from experiments.reporting.report import collect

    cell = collect(("vgg",)).set_index("step").loc["task2-step3"]
    assert cell["source"] == "final" and cell["run_id"] != killed.info.run_id


def test_two_workers_share_one_study_without_losing_a_trial(study_data):
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run(_search_command(4, 2, workers=2), env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "database is locked" not in output
    assert output.count("worker ") >= 2
    study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4 and len(study.trials) == 4
    run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert len(set(run_ids)) == 4
    runs = _trial_runs("task2-step3")
    assert set(run_ids) == set(runs)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())


def test_storage_password_is_masked_in_mlflow(study_data):
    url = "postgresql://optuna:s3cret-pw@127.0.0.1:5432/studies"
    assert config.mask_secrets(url) == "postgresql://optuna:***@127.0.0.1:5432/studies"
    store.init()
    study = load_or_create_study("task2-step3", "vgg", make_storage(), Budget(**TINY))
    parent = ensure_parent_run(study, "task2-step3", "vgg", url, Budget(**TINY))
    run = MlflowClient().get_run(parent)
    everything = str(run.data.tags) + str(run.data.params)
    assert "s3cret-pw" not in everything and "optuna:***@" in run.data.tags["storage"]


def test_duplicate_files_are_refused(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=3)
    (root / "4" / "copy.npy").write_bytes((root / "2" / "img_1.npy").read_bytes())
    with pytest.raises(DatasetError, match="same content as .*img_1.npy but under another class"):
        load_dataset(root)
    (root / "4" / "copy.npy").unlink()
    (root / "2" / "copy.npy").write_bytes((root / "2" / "img_1.npy").read_bytes())
    with pytest.raises(DatasetError, match="duplicate of"):
        load_dataset(root)


def test_bad_data_leaves_nothing_in_mlflow(study_data):
    np.save(study_data / "TEST" / "3" / "bad.npy", np.full((28, 28), np.inf, np.float32))
    proc = subprocess.run(_search_command(2, 1), capture_output=True, text=True)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: ") and "NaN or Inf" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    db = config.mlruns_dir() / "mlflow.db"
    if db.exists():
        store.init()
        assert (
            MlflowClient().search_runs(
                [e.experiment_id for e in MlflowClient().search_experiments()]
            )
            == []
        )
    assert not os.path.exists(config.study_storage())


@pytest.mark.parametrize(
    ("white_per_class", "message"),
    [
        (0, "TEST has no white-background image"),  # the input rules allow it
        (2, "SELECT2 would be empty: TEST's white half has too few images per class"),
    ],
)
def test_a_test_folder_a_task2_step_cannot_use_is_one_line_before_any_run(
    tmp_path, monkeypatch, capsys, white_per_class, message
):
    from experiments.cli import main

    root = tmp_path / "data"
    write_dataset(root / "TRAIN", 12, 0.0, seed=1)
    write_dataset(root / "TEST", 12, white_per_class / 12, seed=2)
    write_dataset(root / "TEST2", 12, 1.0, seed=3)
    monkeypatch.setenv("DATA_DIR", str(root))
    for command in (["train", "--epochs", "1"], ["search", "--trials", "1"]):
        for step in ("task2-step2", "task2-step3"):
            code = main([*command, "--step", step, "--model", "vgg"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1, err
            assert err[0].startswith(f"error: {root / 'TEST'}: ") and message in err[0]
    assert not (config.mlruns_dir() / "mlflow.db").exists()  # no store, so no run of any state
    assert not os.path.exists(config.study_storage())
    assert main(["train", "--step", "task1-step1", "--model", "vgg", "--epochs", "1"]) == 0


def test_two_runs_logging_the_same_dataset_at_once_both_keep_it(tmp_path):
    """MLflow's SQL store checks, then inserts a dataset: two workers' trials logging the same
    set at the same moment broke the unique key and failed a trial (seen in CI with two
    workers). Each round races two threads on a new dataset; every run must end with it."""
    import threading

    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    store.init()
    experiment = store.experiment_id("task2-step3")
    client = MlflowClient()
    run_ids = [client.create_run(experiment).info.run_id for _ in range(2)]
    errors: list[BaseException] = []

    def log(run_id: str, digest: str, barrier: threading.Barrier) -> None:
        dataset = MetaDataset(HTTPDatasetSource("http://127.0.0.1/glyphs"), name="d", digest=digest)
        with mlflow.start_run(run_id=run_id):
            barrier.wait()
            try:
                store.log_input(dataset, context="train")
            except BaseException as exc:  # collected: a thread's exception would be lost
                errors.append(exc)

    digests = [f"{round_:016x}" for round_ in range(12)]
    for digest in digests:
        barrier = threading.Barrier(2, timeout=30)
        threads = [threading.Thread(target=log, args=(r, digest, barrier)) for r in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    for run_id in run_ids:
        logged = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
        assert logged == set(digests)


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """`make reproduce` starts its first jobs together on a fresh clone: each opens the new
    SQLite store. MLflow creates the tables without a lock, so without the file lock in
    `store.init` some of them fail ("table alembic_version already exists", or a
    migration that matched no row); 4 of 4 such attempts failed before the lock."""

    code = "from experiments.tracking import store; store.init(); store.experiment_id('x')"
    env = {**os.environ, "MLRUNS_DIR": str(tmp_path / "store")}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    failed = [
        e.strip().splitlines()[-1] for p, e in zip(procs, errors, strict=True) if p.returncode
    ]
    assert not failed, failed


def test_a_copied_store_is_refused_in_one_line_until_relocated(study_data, tmp_path, monkeypatch,
                                                                capsys):  # fmt: skip
    """`cp -a mlruns copy` + MLRUNS_DIR=copy: refused (nothing written into the original);
    `relocate` points every location into the copy, whose artifacts then serve and grow."""
    import shutil

    from mlflow.tracking import MlflowClient

    from experiments.cli import main
    from experiments.tracking import store

    train = ["train", "--step", "task1-step1", "--model", "vgg", "--epochs", "1"]
    assert main(train) == 0
    original = tmp_path / "mlruns"
    (run,) = runs_in("task1-step1")
    copy = tmp_path / "moved" / "mlruns"
    shutil.copytree(original, copy)
    before = sorted(p for p in original.rglob("*") if p.is_file() and "locks" not in p.parts)
    monkeypatch.setenv("MLRUNS_DIR", str(copy))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # set by MLflow for this process: a new one has not
    store._OPENED.clear()
    capsys.readouterr()
    assert main(train) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: store {copy} was copied or moved: experiment ")
    assert "python -m experiments relocate" in last and str(original) in last
    assert (
        sorted(p for p in original.rglob("*") if p.is_file() and "locks" not in p.parts) == before
    )

    assert main(["relocate"]) == 0
    assert "artifact locations pointed into it" in capsys.readouterr().out
    assert main(["relocate"]) == 0  # a second time: nothing left to move
    assert "already lies inside it" in capsys.readouterr().out
    store._OPENED.clear()
    moved = MlflowClient(store.init()).get_run(run.info.run_id)
    assert moved.info.artifact_uri.startswith(copy.as_uri())
    assert main(train) == 0  # the copy is a store of its own now
    after = sorted(p for p in original.rglob("*") if p.is_file() and "locks" not in p.parts)
    assert after == before  # the original got nothing
    out = tmp_path / "p.csv"
    predict = ["predict", str(study_data / "TEST2"), "--model", run.info.run_id, "--out", str(out)]
    assert main(predict) == 0 and out.exists()  # the old run's checkpoint, read from the copy


def test_relocate_refuses_a_location_of_another_layout(tmp_path, monkeypatch):
    import sqlite3

    from experiments.tracking import store
    from experiments.tracking.relocate import relocate

    store.experiment_id("task2-step1")
    database = tmp_path / "mlruns" / "mlflow.db"
    with sqlite3.connect(database) as connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = 'file:///elsewhere/bucket/x' "
            "WHERE name = 'task2-step1'"
        )
    with pytest.raises(ValueError, match="not of this project's layout"):
        relocate(tmp_path / "mlruns")


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_damaged_store_database_is_one_line_naming_it(tmp_path, capsys):
    from experiments.cli import main

    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    database.write_bytes(b"this is not an SQLite file" * 100)
    assert main(["report", "--out", str(tmp_path / "reports")]) == 2
    last = _last_error(capsys)
    assert last.startswith(f"error: tracking store {database} cannot be read as an MLflow store")
    assert database.read_bytes() == b"this is not an SQLite file" * 100  # left as it was


def test_a_store_locked_by_another_process_is_one_line(study_data, tmp_path, capsys):
    import sqlite3

    from experiments.cli import main
    from experiments.tracking import store

    store.experiment_id("task2-step1")  # a store with its tables
    store._OPENED.clear()
    holder = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, for good
    try:
        start = time.monotonic()
        status = main(["train", "--step", "task2-step1", "--model", "vgg", "--epochs", "1"])
        elapsed = time.monotonic() - start
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == 2 and elapsed < 30
    assert "is locked by another process" in _last_error(capsys)


def test_a_store_on_a_read_only_mount_can_still_be_read(study_data, tmp_path, monkeypatch):
    """EROFS from the lock file (a read-only mount) is handled like EACCES: `predict` reads."""
    import errno

    import filelock

    from experiments.cli import main
    from experiments.tracking import store

    assert main(["train", "--step", "task1-step1", "--model", "vgg", "--epochs", "1"]) == 0
    (run,) = runs_in("task1-step1")
    store._OPENED.clear()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self.lock_file))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    out = tmp_path / "p.csv"
    args = ["predict", str(study_data / "TEST2"), "--model", run.info.run_id]
    assert main([*args, "--out", str(out)]) == 0 and out.exists()


def test_a_storage_password_with_a_space_is_never_printed(capsys):
    from experiments.cli import main

    url = "postgresql://u:s3cr3t pw@127.0.0.1:1/db"
    status = main(["search", "--step", "task2-step3", "--model", "vgg", "--storage", url])
    err = capsys.readouterr().err
    assert status == 2 and "s3cr3t" not in err and " pw@" not in err
    assert err.strip().splitlines()[-1].startswith("error: --storage postgresql")
