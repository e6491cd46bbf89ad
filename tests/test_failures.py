"""Hostile input and failure in the study layer: one line, exit 2, nothing made, nothing left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import runs_in
from mlflow.tracking import MlflowClient

from experiments.cli import main
from experiments.core import config
from experiments.tracking import store


def _nothing_made(tmp_path: Path) -> None:
    assert not (config.mlruns_dir() / "mlflow.db").exists(), "a tracking database was created"
    assert not Path(config.study_storage()).exists(), "a study journal was created"
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "a cache entry was written"


def _one_line_error(capsys, code: int, alone: bool = True) -> str:
    """The command failed with status 2 and exactly one `error:` line (and, `alone`, nothing else)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    if alone:
        assert err.splitlines() == errors, err
    return errors[0]


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql://optuna:s3cret@127.0.0.1:5432/db",
            "postgresql://optuna:***@127.0.0.1:5432/db",
        ),
        ("postgresql://:s3cret@host/db", "postgresql://:***@host/db"),
        ("postgresql://u:s3c@ret@host/db", "postgresql://u:***@host/db"),
        ("sqlite:////tmp/x.db?password=s3cret", "sqlite:////tmp/x.db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&password=s3cret",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("http://user:s3cret@host:5000", "http://user:***@host:5000"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ],
)
def test_passwords_are_masked_by_parsing(url, masked):
    assert config.mask_secrets(url) == masked
    assert (
        config.mask_secrets(f"error: --storage {url}: refused")
        == f"error: --storage {masked}: refused"
    )


def test_storage_query_password_never_reaches_mlflow(study_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}?password=s3cret"
    budget = ["--trials", "1", "--epochs", "1", "--final-epochs", "1", "--train-subset", "0"]
    assert (
        main(["search", "--step", "task2-step3", "--model", "vgg", "--storage", url, *budget]) == 0
    )
    parent = runs_in("task2-step3", "tags.role = 'study'")[0]
    assert "s3cret" not in str(parent.data.tags) + str(parent.data.params)
    assert parent.data.tags["storage"].endswith("?password=***")


@pytest.mark.parametrize(
    "storage",
    [
        "postgresql+psycopg://optuna:s3cret@127.0.0.1:1/studies",  # nothing listens on port 1
        "sqlite:////nonexistent/folder/optuna.db",
        "postgresql+psycopg://optuna:s3c@ret@127.0.0.1:1/studies",
    ],
)
def test_unusable_storage_is_one_line_before_anything_exists(study_data, tmp_path, capsys, storage):
    code = main(["search", "--step", "task2-step3", "--model", "vgg", "--storage", storage])
    line = _one_line_error(capsys, code)
    assert "--storage" in line and "s3cret" not in line and "ret@" not in line
    _nothing_made(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--step", "task2-step3", "--model", "vgg", "--set", "lr=-1"],
        ["train", "--step", "task2-step3", "--model", "vgg", "--set", "lr=inf"],
        ["train", "--step", "task2-step3", "--model", "vgg", "--set", "label_smoothing=5"],
        ["train", "--step", "task2-step3", "--model", "vgg", "--set", "device=cuda"],
        ["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "0"],
        ["search", "--step", "task2-step3", "--model", "vgg", "--final-epochs", "-1"],
        ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "0"],
        ["search", "--step", "task2-step3", "--model", "vgg", "--set", "lr=nan"],
        ["search", "--step", "task2-mixed", "--model", "vgg", "--set", "polarity=keep"],
    ],
)
def test_bad_settings_are_refused_before_anything_exists(study_data, tmp_path, capsys, argv):
    if "device=cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    line = _one_line_error(capsys, main(argv))
    assert "Traceback" not in line
    _nothing_made(tmp_path)


def test_glyph_traceback_adds_where_the_error_came_from(study_data, tmp_path, capsys, monkeypatch):
    argv = ["train", "--step", "task2-step3", "--model", "vgg", "--set", "lr=-1"]
    monkeypatch.setenv("GLYPH_TRACEBACK", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().splitlines()[-1].startswith("error: ")
    monkeypatch.delenv("GLYPH_TRACEBACK")
    assert "Traceback" not in _one_line_error(capsys, main(argv))


def test_init_from_a_file_that_is_not_a_checkpoint(study_data, tmp_path, capsys):
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"not a checkpoint\n")
    argv = ["train", "--step", "task2-step3", "--model", "vgg", "--set", f"init_from={bogus}"]
    line = _one_line_error(capsys, main(argv))
    assert f"{bogus}: not a checkpoint of this project" in line
    _nothing_made(tmp_path)
    missing = ["train", "--step", "task2-step3", "--model", "vgg", "--set", "init_from=nope"]
    assert "no such checkpoint file" in _one_line_error(capsys, main(missing))


def test_report_on_an_empty_store_makes_nothing(tmp_path, capsys):
    line = _one_line_error(capsys, main(["report", "--out", str(tmp_path / "reports")]))
    assert "no finished study" in line
    _nothing_made(tmp_path)
    assert not (tmp_path / "reports").exists()


def test_divergence_ends_the_run_failed_with_reason_and_one_line(study_data, capsys):
    argv = ["train", "--step", "task2-step3", "--model", "vgg", "--epochs", "2"]
    huge = ["--set", "optimizer=sgd", "--set", "lr=1e30", "--set", "schedule=none"]
    line = _one_line_error(capsys, main([*argv, *huge]), alone=False)  # after the epoch lines
    assert line.startswith("error: diverged: ")
    run = runs_in("task2-step3")[0]
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == "diverged"
    assert run.data.tags["state"] == "FAIL"


def test_a_diverging_trial_fails_and_the_study_goes_on(study_data, monkeypatch):
    import experiments.training.runner as runner
    from experiments.search.driver import run_step
    from experiments.search.space import Budget
    from experiments.training.train import Diverged

    real_fit, calls = runner.fit, []

    def diverge_once(cfg, *args, **kwargs):
        calls.append(cfg.seed)
        if len(calls) == 1:
            raise Diverged("training loss is nan")
        return real_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "fit", diverge_once)
    run_step("task2-step3", "vgg", Budget(trials=2, epochs=1, train_subset=0, final_epochs=1))
    trials = runs_in("task2-step3", "tags.role = 'trial'")
    failed = [r for r in trials if r.data.tags["state"] == "FAIL"]
    assert len(trials) == 3 and len(failed) == 1
    assert failed[0].data.tags["fail_reason"] == "diverged"


def test_kill_9_during_the_final_then_resume_leaves_no_running_run(study_data, tmp_path):
    env = {**os.environ, "CI": "1"}
    command = [
        sys.executable, "-m", "experiments", "search", "--step", "task2-step3", "--model", "vgg",
        "--trials", "1", "--epochs", "1", "--train-subset", "0",
    ]  # fmt: skip
    long_final = [*command, "--final-epochs", "400", "--set", "patience=1000"]
    out, err = tmp_path / "search.out", tmp_path / "search.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(long_final, env=env, stdout=stdout, stderr=stderr)
    final = None
    deadline = time.time() + 300
    while time.time() < deadline and final is None:
        time.sleep(0.5)
        assert proc.poll() is None, f"the search exited ({proc.returncode}): {err.read_text()}"
        # The search prints this once its tracking database and parent run exist: only then
        # does this test open the store, so the two processes never race to create it.
        if "finished trials" not in out.read_text():
            continue
        client = MlflowClient(config.tracking_uri())
        experiment = client.get_experiment_by_name("task2-step3")
        found = client.search_runs([experiment.experiment_id], "tags.role = 'final'")
        final = found[0] if found else None
    assert final is not None, "the final retrain did not start in time"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store.init()
    assert MlflowClient().get_run(final.info.run_id).info.status == "RUNNING"  # the orphan

    resumed = subprocess.run(
        [*command, "--final-epochs", "1", "--set", "patience=1000"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ended interrupted runs" in resumed.stdout
    store.init()
    killed = MlflowClient().get_run(final.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["interrupted"] == "true"
    statuses = [r.info.status for r in runs_in("task2-step3")]
    assert "RUNNING" not in statuses
    finals = runs_in("task2-step3", "tags.role = 'final' AND tags.state = 'COMPLETE'")
    assert len(finals) == 1 and finals[0].info.run_id != final.info.run_id


def test_final_models_are_logged_without_pickles_and_load_to_the_same_predictions(study_data):
    import mlflow

    from data_tools import load_split
    from experiments.search.driver import run_step
    from experiments.search.space import Budget
    from experiments.training.checkpoint import load_checkpoint

    result = run_step(
        "task2-step3", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1)
    )
    store.init()
    run = MlflowClient().get_run(result.final_run_id)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.final_run_id}/model"))
    files = [p.name for p in model_dir.rglob("*") if p.is_file()]
    assert "MLmodel" in files and not any(
        n.endswith((".pkl", ".pickle", ".cloudpickle")) for n in files
    )
    assert "python_model.pkl" not in files and "checkpoint.pt" in files
    assert not any(n.endswith(".py") for n in files)  # the code is the installed package's
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{result.final_run_id}/model")
    test2 = load_split("TEST2", study_data)
    frame = pyfunc.predict(test2.images.numpy())
    expected = load_checkpoint(result.final_run_id).predict(test2.images).numpy() + 1
    assert (frame["predicted"].to_numpy() == expected).all()
    accuracy = float((frame["predicted"].to_numpy() - 1 == test2.labels.numpy()).mean())
    assert accuracy == run.data.metrics["TEST2_acc"]
    assert np.allclose(frame[[f"prob_{k}" for k in range(1, 7)]].sum(axis=1), 1.0, atol=1e-5)
