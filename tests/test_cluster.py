"""Scale-out on real engines: Optuna on PostgreSQL and an MLflow tracking server, two workers.

Marked slow; run by `.ci/run` and by `make cluster-test`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cluster import mlflow_server, postgres_bin, postgres_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    if postgres_bin() is None:
        pytest.skip(
            "PostgreSQL is not installed and cannot be installed here (needs root and apt-get)"
        )
    artifacts = tmp_path_factory.mktemp("server") / "artifacts"
    artifacts.mkdir()
    with (
        postgres_server(("optuna", "mlflow")) as urls,
        mlflow_server(urls["mlflow"], artifacts) as tracking,
    ):
        yield {"optuna": urls["optuna"], "tracking": tracking, "artifacts": artifacts}


def test_two_workers_on_postgres_and_mlflow_server(study_data, engines, tmp_path, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": engines["tracking"],
        "OPTUNA_STORAGE": engines["optuna"],
        "CI": "1",
    }
    command = [
        sys.executable, "-m", "experiments", "search", "--step", "task2-step3", "--model", "vgg",
        "--trials", "4", "--epochs", "2", "--train-subset", "0", "--final-epochs", "1", "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    study = optuna.load_study(study_name="task2-step3/vgg", storage=engines["optuna"])
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4

    monkeypatch.setenv("MLFLOW_TRACKING_URI", engines["tracking"])
    import mlflow

    mlflow.set_tracking_uri(engines["tracking"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name("task2-step3")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = {r.info.run_id: r for r in runs if r.data.tags.get("role") == "trial"}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(trials)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in trials.values())
    storage_tag = client.get_run(parent).data.tags["storage"]
    assert "cluster-test-pw" not in storage_tag and "***" in storage_tag
    states = {run_id: run.data.tags["state"] for run_id, run in trials.items()}
    reasons = {run_id: trials[run_id].data.tags.get("fail_reason") for run_id in states}
    assert "COMPLETE" in states.values() and set(states.values()) <= {"COMPLETE", "PRUNED"}, (
        states,
        reasons,
        proc.stdout[-3000:],
    )
    for run_id, state in states.items():  # a pruned trial stops before its artifacts
        if state == "COMPLETE":
            names = {a.path for a in client.list_artifacts(run_id)}
            assert {"history.json", "checkpoint"} <= names
        else:
            assert trials[run_id].info.status == "KILLED"
    final = [r for r in runs if r.data.tags.get("role") == "final"]
    assert len(final) == 1
    assert "TEST2_acc" in final[0].data.metrics
    assert any(engines["artifacts"].rglob("model.pt")), "artifacts land in the server's destination"

    # more seeds of the answer, from another process, through the same server
    seeds = [sys.executable, "-m", "experiments", "seeds", "--step", "task2-step3",
             "--model", "vgg", "--seeds", "1"]  # fmt: skip
    proc = subprocess.run(seeds, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = client.search_runs([experiment.experiment_id], "tags.role = 'seed'", max_results=10)
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parent
    assert "TEST2_acc_ci_low" in runs[0].data.metrics
