"""Misuse of the store and the study storage: a journal without its database, two stores on one
journal, the study lock on every storage, workers outliving their launcher, refusals that
change state, secrets in ambiguous URLs, copied stores reached by URI, odd store paths,
unsupported tracking URIs, read-only stores, the search's answer, and SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import runs_in
from optuna.trial import TrialState
from synthetic import write_study_data

from experiments.cli import main
from experiments.core import config
from experiments.search import driver, study
from experiments.search.space import Budget
from experiments.tracking import store

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=1, warmup_epochs=0)
STUDY = "task2-step3/vgg"
SEARCH = ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "1", "--epochs", "1",
          "--train-subset", "0", "--final-epochs", "1"]  # fmt: skip


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _trial_states(storage: str | None = None) -> list[str]:
    handle = optuna.load_study(study_name=STUDY, storage=study.make_storage(storage))
    return [t.state.name for t in handle.trials]


def _reopen(monkeypatch, mlruns: Path) -> None:
    """A new process's view: another store folder, nothing opened yet."""
    monkeypatch.setenv("MLRUNS_DIR", str(mlruns))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by MLflow for this process
    store._OPENED.clear()


# 1. a study journal without its database; two stores sharing one journal


def test_a_journal_whose_database_was_moved_aside_is_refused_and_left_alone(
    study_data, tmp_path, monkeypatch, capsys
):
    driver.run_step("task2-step3", "vgg", Budget(**TINY), final=False)
    mlruns = tmp_path / "mlruns"
    before = _trial_states()
    (mlruns / "mlflow.db").rename(tmp_path / "mlflow.db.aside")
    _reopen(monkeypatch, mlruns)
    capsys.readouterr()
    line = _one_line_error(capsys, main(SEARCH))
    assert f"study {STUDY} in {mlruns / 'optuna.journal'} belongs to another tracking store" in line
    assert _trial_states() == before  # no FAIL trial added
    assert not (mlruns / "mlflow.db").exists()  # no empty store made beside the journal


def test_a_second_store_on_the_same_journal_never_fails_the_first_stores_live_trial(
    study_data, tmp_path, monkeypatch, capsys
):
    driver.run_step("task2-step3", "vgg", Budget(**TINY), final=False)
    journal = tmp_path / "mlruns" / "optuna.journal"
    handle = optuna.load_study(study_name=STUDY, storage=study.make_storage())
    live = handle.ask()  # the first store's launcher, mid-trial
    _reopen(monkeypatch, tmp_path / "other")
    monkeypatch.setenv("OPTUNA_STORAGE", str(journal))
    capsys.readouterr()
    line = _one_line_error(capsys, main(SEARCH))
    assert "belongs to another tracking store" in line
    handle = optuna.load_study(study_name=STUDY, storage=study.make_storage())
    assert handle.trials[live.number].state == TrialState.RUNNING
    assert "FAIL" not in _trial_states()


# 2. the study lock on every storage; a dead holder's lock is taken over


def _holder(storage: str | None, fork: bool = False) -> subprocess.Popen:
    code = (
        "import os, signal, sys, time\n"
        "from experiments.search import study\n"
        f"with study.study_lock({STUDY!r}, {storage!r}):\n"
        "    if " + str(fork) + ":\n"
        "        child = os.fork()\n"
        "        if child == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        print(child, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    return proc


def test_a_sqlite_study_storage_is_locked_like_a_journal(study_data, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    holder = _holder(storage)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_line_error(capsys, main([*SEARCH, "--storage", storage]))
        assert line.startswith(f"error: study {STUDY} is being run by process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert runs_in("task2-step3") == []  # nothing started


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    """The holder forks a child (which inherits its open files) and dies: the study is free."""
    holder = _holder(None, fork=True)
    child = int(holder.stdout.readline())
    holder.wait()
    try:
        with study.study_lock(STUDY, None):
            text = (config.mlruns_dir() / "locks" / "task2-step3__vgg.lock").read_text()
            assert text.startswith(f"process {os.getpid()} ")
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_refusal_names_the_live_holder(tmp_path):
    holder = _holder(None)
    try:
        assert holder.stdout.readline().strip() == "held"
        path = config.mlruns_dir() / "locks" / "task2-step3__vgg.lock"  # beside the journal
        path.write_text("process 999999999 on nowhere\n")  # a dead writer's line
        refused = pytest.raises(RuntimeError, match=f"being run by process {holder.pid} ")
        with refused as caught, study.study_lock(STUDY, None):
            pass
        assert "999999999" not in str(caught.value)
    finally:
        holder.kill()
        holder.wait()


# 3. workers die with their launcher


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_workers_die_when_their_launcher_is_killed(study_data):
    command = [sys.executable, "-m", "experiments", *SEARCH[:-8], "--trials", "2",
               "--epochs", "400", "--train-subset", "0", "--workers", "2", "--set",
               "patience=1000"]  # fmt: skip
    launcher = subprocess.Popen(
        command, env={**os.environ, "CI": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2:
            workers = _children(launcher.pid)
            time.sleep(0.5)
        assert len(workers) == 2, launcher.poll()
        time.sleep(3)  # the workers are importing or training
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its launcher"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


# 4. a refusal changes no run's state


def test_a_resume_refused_for_other_data_leaves_the_study_run_finished(study_data, tmp_path):
    driver.run_step("task2-step3", "vgg", Budget(**TINY), final=False)
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    assert parent.info.status == "FINISHED"
    shutil.rmtree(study_data)
    write_study_data(study_data, per_class=21)  # other data
    with pytest.raises(ValueError, match="scored on other data"):
        driver.run_step("task2-step3", "vgg", Budget(**TINY), final=False)
    (still,) = runs_in("task2-step3", "tags.role = 'study'")
    assert still.info.status == "FINISHED" and "fail_reason" not in still.data.tags


# 5. every URL that reaches output is masked


@pytest.mark.parametrize("password", ["pa@ss", "pa%40ss"])
def test_a_password_with_an_at_sign_never_reaches_the_dashboard_line(password, capsys):
    url = f"postgresql+psycopg://optuna:{password}@127.0.0.1:1/studies"
    code = main(["dashboard", "--storage", url, "--port", "1"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2 and "ss@" not in text and password not in text
    assert "optuna:***@127.0.0.1:1/studies" in text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pa@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:pa%40ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p@s/s@host/db", "postgresql://u:***@host/db"),
    ],
)
def test_an_ambiguous_password_is_masked_whole(url, masked):
    assert config.mask_url(url) == masked
    assert config.mask_secrets(f"store {url}: refused") == f"store {masked}: refused"


def test_a_tracking_uri_with_a_raw_at_sign_is_refused_fast_without_its_password(tmp_path):
    uri = "postgresql+psycopg://u:pa@ss@127.0.0.1:1/db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-m", "experiments", "report", "--out", str(tmp_path / "r")],
        env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ss@" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: MLFLOW_TRACKING_URI=")


def test_a_postgres_secret_fragment_in_a_driver_message_is_masked(monkeypatch):
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql://u:pa@ss@127.0.0.1:1/db")
    line = config.mask_secrets("failed to resolve host 'ss@127.0.0.1'")
    assert "ss@" not in line and "***@127.0.0.1" in line


# 6. the store check covers an explicit tracking URI


def test_a_copied_store_reached_by_an_explicit_uri_is_refused(study_data, tmp_path, monkeypatch,
                                                             capsys):  # fmt: skip
    train = ["train", "--step", "task1-step1", "--model", "vgg", "--epochs", "1"]
    assert main(train) == 0
    original = tmp_path / "mlruns"
    copy = tmp_path / "moved" / "mlruns"
    shutil.copytree(original, copy)
    files = sorted(p for p in original.rglob("*") if p.is_file() and "locks" not in p.parts)
    before = {p: p.stat().st_mtime_ns for p in files}
    store._OPENED.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    capsys.readouterr()
    line = _one_line_error(capsys, main(train))
    assert line.startswith(f"error: store {copy} was copied or moved")
    after = sorted(p for p in original.rglob("*") if p.is_file() and "locks" not in p.parts)
    assert after == files and all(p.stat().st_mtime_ns == before[p] for p in files)


# 7. store paths holding ?, # or %


@pytest.mark.parametrize("name", ["a?b", "a#b", "a%41b"])
def test_a_store_path_with_uri_characters_is_refused_fast(
    study_data, tmp_path, monkeypatch, capsys, name
):
    mlruns = tmp_path / name / "mlruns"
    _reopen(monkeypatch, mlruns)
    start = time.monotonic()  # a guard against a hang, not a speed target
    line = _one_line_error(
        capsys, main(["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "1"])
    )
    assert time.monotonic() - start < 60
    assert line.startswith(f"error: MLRUNS_DIR={mlruns}: ")
    assert not any(tmp_path.rglob("*.db")), "a database was created"
    _reopen(monkeypatch, mlruns)  # a read (report) names the path too, not an empty store
    assert _one_line_error(capsys, main(["report"])).startswith("error: MLRUNS_DIR=")


# 8. unsupported tracking URIs


@pytest.mark.parametrize(
    "uri", ["/tmp/some/mlruns", "file:///tmp/mlruns", "mysql://u:pw@127.0.0.1:1/db", "databricks"]
)
def test_an_unsupported_tracking_uri_is_one_line(study_data, tmp_path, monkeypatch, capsys, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = _one_line_error(
        capsys, main(["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "1"])
    )
    assert "not a supported tracking store" in line and "sqlite:////" in line
    assert ":pw@" not in line


# 9. a read-only store at a new path


def test_relocating_a_read_only_store_is_one_line_naming_it(study_data, tmp_path, monkeypatch,
                                                            capsys):  # fmt: skip
    import errno

    import filelock

    assert main(["train", "--step", "task1-step1", "--model", "vgg", "--epochs", "1"]) == 0
    copy = tmp_path / "moved" / "mlruns"
    shutil.copytree(tmp_path / "mlruns", copy)
    _reopen(monkeypatch, copy)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self.lock_file))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    capsys.readouterr()
    line = _one_line_error(capsys, main(["relocate"]))
    assert line.startswith(f"error: relocate: {copy / 'mlflow.db'}: the store is read-only")


# 10. the search's summary names the answer


def test_when_the_baseline_wins_the_result_and_its_line_name_the_baseline(study_data,
                                                                          monkeypatch):  # fmt: skip
    real = driver.select

    def baseline_wins(handle, parent, final_id, final_metrics, baseline_id, baseline_metrics):
        return real(handle, parent, final_id, {**final_metrics, "best_val_acc": -1.0},
                    baseline_id, baseline_metrics)  # fmt: skip

    real_objective = driver.make_objective

    def defaults_lose(*args, **kwargs):  # trial 0 (the defaults) never wins the search
        objective = real_objective(*args, **kwargs)
        return lambda trial: objective(trial) - (1.0 if trial.number == 0 else 0.0)

    monkeypatch.setattr(driver, "make_objective", defaults_lose)
    monkeypatch.setattr(driver, "select", baseline_wins)
    monkeypatch.setattr(driver, "log_answer_tta", lambda *args: None)
    result = driver.run_step("task2-step3", "vgg", Budget(**{**TINY, "trials": 2}))
    (baseline,) = runs_in("task2-step3", "tags.role = 'baseline'")
    assert result.answer_run_id == baseline.info.run_id != result.final_run_id
    assert result.answer_role == "baseline"
    assert result.answer_val_acc == baseline.data.metrics["best_val_acc"]
    line = driver.summary_line(result)
    assert f"answer: baseline run {baseline.info.run_id}" in line
    assert result.final_run_id not in line


# 11. report --ensemble -1


def test_a_negative_ensemble_count_is_refused_without_naming_a_file(tmp_path, capsys):
    out = tmp_path / "reports"
    line = _one_line_error(capsys, main(["report", "--out", str(out), "--ensemble", "-1"]))
    assert "--ensemble -1" in line and "ensembles.csv" not in line
    assert not out.exists()


# 12. SIGTERM during a search


def test_sigterm_during_a_search_ends_without_a_traceback(study_data):
    command = [sys.executable, "-m", "experiments", *SEARCH[:-8], "--trials", "2",
               "--epochs", "400", "--train-subset", "0", "--set", "patience=1000"]  # fmt: skip
    proc = subprocess.Popen(
        command, env={**os.environ, "CI": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "running 2 more" in line:
                break
        time.sleep(4)  # inside trial 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, 128 + signal.SIGTERM)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _trial_states()[0] == "FAIL"
    (trial,) = runs_in("task2-step3", "tags.role = 'trial'")
    assert trial.info.status == "KILLED"


def test_a_termination_signal_maps_to_its_exit_status():
    from experiments.search import process as signals

    assert signals.final_status(130) == 130  # Ctrl-C
    with pytest.raises(KeyboardInterrupt) as caught:
        signals.terminated_handler(signal.SIGTERM, None)
    assert signals.exit_status(caught.value) == 143
    assert signals.exit_status(KeyboardInterrupt()) == 130
    try:
        assert signals.final_status(130) == 143 and signals.final_status(2) == 143
        assert signals.final_status(0) == 0
    finally:
        signals._received.clear()


def test_a_lock_file_planted_as_a_symlink_in_a_shared_folder_is_refused(tmp_path, monkeypatch):
    """A database-server study's lock lives in a temporary folder of this user's; a link
    planted where the lock file goes is refused, and its target left untouched."""
    import tempfile

    from experiments.search import process

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    url = "postgresql://u:pw@127.0.0.1:1/db"
    path = process.lock_path("task2-step3/vgg", url)
    assert str(os.getuid()) in path.parent.name
    path.parent.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    path.symlink_to(victim)
    with (
        pytest.raises(RuntimeError, match="symbolic link"),
        process.study_lock("task2-step3/vgg", url),
    ):
        pass
    assert victim.read_text() == "keep me\n"


def test_a_server_that_exits_with_an_error_makes_serve_fail(monkeypatch, capsys):
    import experiments.serving.serve as serving

    monkeypatch.setattr(serving, "serve", lambda model, host, port: 1)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exited with status 1" in err[0]
    monkeypatch.setattr(serving, "serve", lambda model, host, port: 130)  # Ctrl-C: a normal end
    assert main(["serve"]) == 0
