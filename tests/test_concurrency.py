"""A study held by a live process is refused, a crashed one's is reclaimed, and a study is
never resumed with other fixed settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import runs_in

from experiments.cli import main
from experiments.search import study
from experiments.search.driver import run_step
from experiments.search.space import Budget

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=1)


def test_a_study_a_live_process_runs_is_refused_in_one_line(study_data, capsys):
    with study.study_lock("task2-step3/vgg", None):  # another launcher holds it
        code = main(["search", "--step", "task2-step3", "--model", "vgg", "--trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: study task2-step3/vgg is being run by")
    assert f"process {os.getpid()}" in err[-1]
    assert runs_in("task2-step3") == []  # nothing started, nothing marked failed


def test_a_crashed_processs_lock_is_released(study_data, tmp_path):
    code = (
        "import os, signal\n"
        "from experiments.search import study\n"
        "with study.study_lock('task2-step3/vgg', None):\n"
        "    print('held', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    held = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert held.stdout.strip() == "held" and held.returncode == -signal.SIGKILL
    with study.study_lock("task2-step3/vgg", None):  # free again: the holder is gone
        pass


def test_a_study_is_never_resumed_with_other_fixed_settings(study_data):
    run_step("task2-step3", "vgg", Budget(**TINY, overrides={"lr": "0.003"}))
    handle = optuna.load_study(study_name="task2-step3/vgg", storage=study.make_storage())
    before = (len(handle.trials), len(runs_in("task2-step3")))
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    with pytest.raises(ValueError, match=r"lr: 0\.003 then, 0\.5 now"):
        run_step("task2-step3", "vgg", Budget(**TINY, overrides={"lr": "0.5"}))
    handle = optuna.load_study(study_name="task2-step3/vgg", storage=study.make_storage())
    assert (len(handle.trials), len(runs_in("task2-step3"))) == before  # nothing changed
    (still,) = runs_in("task2-step3", "tags.role = 'study'")
    assert still.info.status == parent.info.status == "FINISHED"
    finals = runs_in("task2-step3", "tags.role = 'final'")
    assert [r.data.params["lr"] for r in finals] == ["0.003"]  # the final names its settings
    run_step("task2-step3", "vgg", Budget(**TINY, overrides={"lr": "0.003"}))  # same: resumes
    handle = optuna.load_study(study_name="task2-step3/vgg", storage=study.make_storage())
    assert len(handle.trials) == before[0]  # complete already: no trial, no new final
    assert len(runs_in("task2-step3", "tags.role = 'final'")) == 1


def test_an_unreachable_tracking_server_is_one_masked_line_within_30_s(study_data, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:s3cret pass@127.0.0.1:{port}"}
    for command in (["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "1"],
                    ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "1"]):  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "experiments", *command], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert time.perf_counter() - start < 30
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and "unreachable" in err[0]
        assert "s3cret" not in done.stderr + done.stdout and "alice:***@" in err[0]


def test_a_damaged_journal_line_is_named_with_its_repair(study_data, capsys):
    from experiments.core import config

    run_step("task2-step3", "vgg", Budget(**TINY))
    journal = config.mlruns_dir() / "optuna.journal"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2] + ["garbage{not json\n"] + lines[2:]))
    code = main(["search", "--step", "task2-step3", "--model", "vgg", "--trials", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{journal}: line 3 is not a study journal record" in err
    assert f"sed -i '3d' {journal}" in err
    journal.write_text("".join(lines))  # repaired as the message says: the study resumes
    assert main(["search", "--step", "task2-step3", "--model", "vgg", "--trials", "2"]) == 0


def test_sigterm_during_train_ends_its_run_killed(study_data):
    from mlflow.tracking import MlflowClient

    from experiments.tracking import store

    command = [sys.executable, "-m", "experiments", "train", "--step", "task2-step3",
               "--model", "vgg", "--epochs", "500", "--set", "patience=500"]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # the first epoch's line: its run exists and trains
            if " epoch " in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143  # 128 + SIGTERM
    finally:
        process.kill()
    store.init()
    (run,) = runs_in("task2-step3")
    assert run.info.status == "KILLED" and run.data.tags["interrupted"] == "true"
    assert MlflowClient().get_run(run.info.run_id).info.end_time is not None
