"""More seeds of a study's answer: only the seed changes, each seed is made once, and the
report reads the cell as mean ± sd over seeds."""

from __future__ import annotations

import statistics

from conftest import runs_in

from experiments.cli import main

TINY = ["--trials", "1", "--epochs", "1", "--final-epochs", "1", "--train-subset", "0"]


def _settings(run) -> dict:
    return {k: v for k, v in run.data.params.items() if k != "seed"}


def test_seeds_retrain_the_answer_with_only_the_seed_changed_once_each(study_data, capsys):
    assert main(["search", "--step", "task2-step3", "--model", "vgg", *TINY]) == 0
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    answer_id = parent.data.tags["selected_run"]
    (answer,) = [r for r in runs_in("task2-step3") if r.info.run_id == answer_id]
    assert main(["seeds", "--step", "task2-step3", "--model", "vgg", "--seeds", "2"]) == 0
    seeds = runs_in("task2-step3", "tags.role = 'seed'")
    assert len(seeds) == 2
    answer_seed = int(answer.data.params["seed"])
    assert sorted(int(r.data.params["seed"]) for r in seeds) == [answer_seed + 1, answer_seed + 2]
    for run in seeds:
        assert _settings(run) == _settings(answer)  # exactly the answer's settings
        assert run.data.tags["seed_of"] == answer_id and run.data.tags["study"] == "task2-step3/vgg"
        assert run.info.status == "FINISHED" and "TEST2_acc" in run.data.metrics
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id  # under the study
    out = capsys.readouterr().out
    values = [answer.data.metrics["TEST2_acc"]] + [r.data.metrics["TEST2_acc"] for r in seeds]
    expected = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (3 seeds)"
    assert expected in out
    # asking for three: only the missing one is trained
    assert main(["seeds", "--step", "task2-step3", "--model", "vgg", "--seeds", "3"]) == 0
    assert len(runs_in("task2-step3", "tags.role = 'seed'")) == 3
    out = capsys.readouterr().out
    assert out.count("(found)") == 2 and out.count("(trained)") == 1


def test_seeds_of_a_study_that_never_ran_is_one_line(study_data, capsys):
    assert main(["seeds", "--step", "task2-step3", "--model", "vgg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished study answer" in err[0]


def test_the_plan_lists_each_missing_seed_once_and_only_trains_the_one_asked_for(
    study_data, capsys
):
    """`seeds --plan` gives one goal per missing seed, longest answer first; `--only K`
    trains the K-th alone; a seed already trained leaves the plan."""
    from experiments.tracking import results

    for model in ("vgg", "resnet"):
        assert main(["search", "--step", "task2-step3", "--model", model, *TINY]) == 0
    capsys.readouterr()
    plan = ["seeds", "--plan", "--step", "task2-step3", "--model", "vgg", "--model", "resnet"]
    assert main([*plan, "--seeds", "2"]) == 0
    goals = capsys.readouterr().out.split()
    assert sorted(goals) == sorted(
        f"task2-step3.{m}.{k}" for m in ("vgg", "resnet") for k in (1, 2)
    )
    took = {  # the answer's epochs times its last epoch's seconds: what a seed repeats
        m: (lambda r: r["metrics.epochs_run"] * r["metrics.epoch_seconds"])(
            results.final_run("task2-step3", m)
        )
        for m in ("vgg", "resnet")
    }
    longest = max(took, key=took.get)
    assert goals[0].split(".")[1] == longest and goals[1].split(".")[1] == longest
    assert (
        main(["seeds", "--step", "task2-step3", "--model", "vgg", "--seeds", "2", "--only", "2"])
        == 0
    )
    (seed,) = runs_in("task2-step3", "tags.role = 'seed'")
    answer = results.final_run("task2-step3", "vgg")
    assert seed.data.params["seed"] == str(int(answer["params.seed"]) + 2)
    assert "(2 seeds)" in capsys.readouterr().out  # the answer and the one seed so far
    assert main([*plan, "--seeds", "2"]) == 0
    assert "task2-step3.vgg.2" not in capsys.readouterr().out.split()
    assert main(["seeds", "--step", "task2-step3", "--model", "vgg", "--only", "3"]) == 2
    assert "only=3" in capsys.readouterr().err
