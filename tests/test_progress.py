"""`make progress`: where `make reproduce` stands, read from the store."""

from __future__ import annotations

import re

from experiments.cli import main
from experiments.reporting.progress import progress_text
from experiments.search.driver import run_step
from experiments.search.space import Budget

TINY = dict(trials=2, epochs=1, train_subset=0, final_epochs=1, warmup_epochs=0)


def test_an_empty_store_says_so(study_data):
    assert progress_text() == "No study of `make reproduce` in this store yet."


def test_a_finished_study_shows_its_trials_answer_and_interval_and_the_rest_not_started(
    study_data, capsys
):
    run_step("task2-step3", "vgg", Budget(**TINY))
    assert main(["progress"]) == 0
    text = capsys.readouterr().out
    rows = {
        cells[1]: cells[2:-1]
        for line in text.splitlines()
        if line.startswith("| task")
        for cells in [[c.strip() for c in line.split("|")]]
    }
    state, trials, answer, seeds, evaluation = rows["task2-step3/vgg"]
    assert (state, trials, seeds) == ("finished", "2", "0") and answer in ("final", "baseline")
    assert re.fullmatch(r"TEST2 0\.\d{4} \[0\.\d{4}, (0\.\d{4}|1\.0000)\]", evaluation)
    others = [cells for study, cells in rows.items() if study != "task2-step3/vgg"]
    assert len(others) == 19 and all(cells[0].startswith("not started") for cells in others)
    assert rows["task2-step1/vgg"][:2] == ["not started (reuses task1-step1)", "-"]
    assert "Studies of `make reproduce`: 20 (19 not started, 1 finished)." in text
    lanes = {
        cells[1]: cells[2:-1]
        for line in text.splitlines()
        for cells in [[c.strip() for c in line.split("|")]]
        if len(cells) > 2 and cells[1] in ("trial", "final", "baseline")
    }
    assert lanes["trial"][0] == "2" and lanes["final"][0] == "1"  # runs per role


def test_a_study_still_running_alone_in_its_experiment_is_shown_with_its_time_so_far(
    study_data, capsys
):
    """The start of a run: a study parent and its first trial, both RUNNING, beside a
    finished study of another experiment (MLflow gives such an experiment no end times)."""
    import mlflow

    from experiments.tracking import store

    run_step("task2-step3", "vgg", Budget(**TINY))
    store.init()
    experiment = store.experiment_id("task1-step1")
    parent = mlflow.start_run(experiment_id=experiment, tags={"role": "study", "model": "vgg"})
    mlflow.start_run(experiment_id=experiment, nested=True, tags={"role": "trial", "model": "vgg"})
    try:
        text = progress_text()
    finally:
        mlflow.end_run()
        mlflow.end_run()
    assert parent.info.run_id
    (row,) = [line for line in text.splitlines() if line.startswith("| task1-step1/vgg ")]
    assert "| running " in row
    (trials,) = [line for line in text.splitlines() if line.startswith("| trial ")]
    assert trials.split("|")[2].strip() == "3"  # two finished, one running


def test_a_run_found_dead_ends_when_it_last_logged_and_counts_only_until_then(tmp_path):
    """A trial killed -9 an hour after its start, its last epoch logged then, found dead an
    hour later: it ends at its last metric, and its lane-minutes are 60, not 120."""
    import time

    from mlflow.tracking import MlflowClient

    from experiments.reporting.progress import lane_minutes
    from experiments.tracking import results, store

    store.init()
    client = MlflowClient()
    start = int(time.time() * 1000) - 2 * 3600 * 1000
    run = client.create_run(store.experiment_id("task1-step1"), start_time=start)
    run_id = run.info.run_id
    client.set_tag(run_id, "role", "trial")
    client.log_metric(run_id, "val_acc", 0.5, timestamp=start + 30 * 60 * 1000)
    client.log_metric(run_id, "val_acc", 0.6, timestamp=start + 60 * 60 * 1000)
    store.mark_interrupted(client, run_id, results.last_logged(client, run_id))
    assert client.get_run(run_id).info.end_time == start + 60 * 60 * 1000
    lanes = lane_minutes(results.search("task1-step1")).set_index("role")
    assert lanes.loc["trial", "interrupted, failed or running"] == 60.0
