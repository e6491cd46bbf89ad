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
    assert len(others) == 19 and all(cells[0] == "not started" for cells in others)
    assert "Studies of `make reproduce`: 20 (19 not started, 1 finished)." in text
    lanes = {
        cells[1]: cells[2:-1]
        for line in text.splitlines()
        for cells in [[c.strip() for c in line.split("|")]]
        if len(cells) > 2 and cells[1] in ("trial", "final", "baseline")
    }
    assert lanes["trial"][0] == "2" and lanes["final"][0] == "1"  # runs per role
