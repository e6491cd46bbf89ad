"""Optuna studies nested in MLflow, resume after a crash, the report, and label-blind selection."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
from conftest import runs_in
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from synthetic import permute_labels

from experiments.core.settings import resolve
from experiments.core.steps import STEPS
from experiments.reporting.report import build_report
from experiments.search.driver import run_step
from experiments.search.space import Budget, suggest
from experiments.search.study import load_or_create_study, make_storage, study_name
from experiments.tracking import store

TINY = dict(trials=3, epochs=2, train_subset=0, final_epochs=1, warmup_epochs=0)


def test_study_nests_trials_with_states_and_prunes(study_data, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    result = run_step("task2-step3", "vgg", Budget(**TINY))
    runs = runs_in("task2-step3")
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    trials = sorted(
        (r for r in runs if r.data.tags.get("role") == "trial"),
        key=lambda r: int(r.data.tags["trial_number"]),
    )
    finals = [r for r in runs if r.data.tags.get("role") == "final"]
    assert len(parents) == 1 and len(trials) == 3 and len(finals) == 1
    parent = parents[0]
    assert (
        parent.data.tags["study"] == "task2-step3/vgg" and parent.data.tags["budget.trials"] == "3"
    )
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials + finals)
    assert [r.data.tags["state"] for r in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [r.info.status for r in trials] == ["FINISHED", "KILLED", "FINISHED"]
    assert [r.info.run_name for r in trials] == ["trial-0", "trial-1", "trial-2"]
    best_tags = [r.data.tags.get("best") for r in trials]
    assert best_tags.count("true") == 1 and best_tags[1] != "true"
    assert finals[0].data.tags["best"] == "true" and finals[0].data.tags["retrain_of_trial"] == str(
        result.best_trial
    )
    assert "best_val_acc" in parent.data.metrics
    assert any(k.startswith("best.") for k in parent.data.params)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in artifacts
    study = optuna.load_study(study_name="task2-step3/vgg", storage=make_storage())
    for trial in study.trials:
        assert trial.user_attrs["mlflow_run_id"] in {r.info.run_id for r in trials}
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    # the trial's params are the run's params, unchanged
    first = trials[0]
    for key, value in study.trials[0].params.items():
        assert first.data.params[key] == str(value)


def test_resume_after_crash_fails_stale_trial_and_completes_count(study_data):
    budget = Budget(**TINY)
    store.init()
    storage = make_storage()
    study = load_or_create_study("task2-step2", "resnet", storage, budget)
    from experiments.training.runner import load_step_data

    study.set_user_attr("data_key", load_step_data(STEPS["task2-step2"]).data_key)  # as a run does
    crashed = study.ask()  # left RUNNING, as by a process killed mid-trial
    client = MlflowClient()
    run = client.create_run(
        store.experiment_id("task2-step2"), run_name="trial-0", tags={"role": "trial"}
    )
    crashed.set_user_attr("mlflow_run_id", run.info.run_id)

    run_step("task2-step2", "resnet", Budget(**{**TINY, "trials": 2}), final=False)
    study = optuna.load_study(study_name=study_name("task2-step2", "resnet"), storage=storage)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2
    stale = client.get_run(run.info.run_id)
    assert stale.info.status == "KILLED" and stale.data.tags["interrupted"] == "true"

    # resuming a complete study adds no trial
    run_step("task2-step2", "resnet", Budget(**{**TINY, "trials": 2}), final=False)
    assert len(optuna.load_study(study_name="task2-step2/resnet", storage=storage).trials) == 3


def test_report_builds_table_from_runs(study_data, tmp_path):
    run_step("task1-step1", "hybrid", Budget(**{**TINY, "trials": 2}))
    out, cells = build_report(tmp_path / "report")
    cells = cells.set_index(["step", "model"])
    assert cells.loc[("task1-step1", "hybrid"), "accuracy"] > 0
    assert cells.loc[("task1-step1", "hybrid"), "white_acc"] >= 0
    reused = cells.loc[("task2-step1", "hybrid")]  # reused from task1-step1: the same run
    assert reused["run_id"] == cells.loc[("task1-step1", "hybrid"), "run_id"]
    assert reused["accuracy"] == pytest.approx(
        runs_in("task1-step1", "tags.role = 'final'")[0].data.metrics["TEST2_acc"]
    )
    assert pd.isna(cells.loc[("task2-step2", "vgg"), "accuracy"])  # missing study: empty cell
    text = (out / "comparison.md").read_text()
    # the TRAIN / TEST row's hybrid cell: the run's own TEST accuracy, then the difference to
    # the reference notebooks' number, both read from the store's run, not retyped here
    answer = cells.loc[("task1-step1", "hybrid"), "run_id"]  # the final or the baseline
    final = MlflowClient().get_run(answer).data.metrics["TEST_acc"]
    row = next(line for line in text.splitlines() if line.startswith("| TRAIN / TEST "))
    hybrid_cell = row.split("|")[5]  # the row label, then vgg, resnet, efficientnet, hybrid
    reference = 0.57  # TASKS.md, VGG+ResNet trained on TRAIN, evaluated on TEST
    assert f"**{final:.3f}** [" in hybrid_cell and f"(ref {reference:.2f}: " in hybrid_cell
    assert (out / "comparison.csv").read_text().count("\n") == 1 + 4 * len(STEPS)
    # no rough edges: provenance named, integers as integers, no nan, unrun steps named once
    assert text.startswith("# Comparison") and "Generated on " in text and "from the store" in text
    assert "nan" not in text and "| Task 2: Task 2" not in text
    details = text.partition("## Details per cell")[2].partition("\n## ")[0]
    header = next(line for line in details.splitlines() if line.startswith("| step"))
    row = next(line for line in details.splitlines() if line.startswith("| task1-step1 | hybrid"))
    names = [c.strip() for c in header.split("|")]
    fields = dict(zip(names, (c.strip() for c in row.split("|")), strict=True))
    assert fields["trials"] == "2" and fields["seeds"] == "1"  # integers, not 2.0000
    assert "Not run here" in text and "task2-mixed" in text.partition("Not run here")[2]
    table = text.partition("## Details per cell")[0]
    assert "Mixed" not in table and "task2-mixed" not in details
    assert (out / "comparison.png").stat().st_size > 0


def test_selection_ignores_evaluation_labels(study_data, monkeypatch, tmp_path):
    budget = Budget(**{**TINY, "trials": 3})
    first = run_step("task1-step1", "vgg", budget, final=False)
    permute_labels(study_data / "TEST")
    permute_labels(study_data / "TEST2")
    monkeypatch.setenv("MLRUNS_DIR", str(tmp_path / "mlruns-permuted"))
    second = run_step("task1-step1", "vgg", budget, final=False)
    assert (second.best_trial, second.best_params, second.best_val_acc) == (
        first.best_trial,
        first.best_params,
        first.best_val_acc,
    )


@pytest.mark.parametrize("model", ["vgg", "resnet", "efficientnet", "hybrid"])
def test_search_space_builds_every_model(model):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(4):
        trial = study.ask()
        cfg = resolve(model, searched=suggest(trial, model))
        flat = cfg.flat()
        assert all(flat[key] == value for key, value in trial.params.items())
        study.tell(trial, 0.0)


def test_unknown_model_is_refused_by_the_search_space():
    trial = optuna.create_study().ask()
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        suggest(trial, "alexnet")


@given(
    images=st.integers(100, 200_000),
    final_images=st.integers(1_000, 500_000),
    trial_images=st.integers(1_000, 100_000),
    subset=st.integers(0, 20_000),
)
def test_budget_epochs_spend_the_image_budgets(images, final_images, trial_images, subset):
    """Epochs follow from image budgets: a final's whole epochs reach its budget (rounded up,
    so a split a little larger than half the budget trains twice, not once), kept within
    their bounds, never more epochs for a larger split."""
    budget = Budget(final_images=final_images, trial_images=trial_images, train_subset=subset)
    low, high = budget.final_min_epochs, budget.final_max_epochs
    epochs = budget.retrain_epochs(images)
    assert low <= epochs <= high
    if low < epochs < high:  # not clamped: the fewest whole epochs that reach the budget
        assert (epochs - 1) * images < final_images <= epochs * images
    assert budget.retrain_epochs(images + 1) <= epochs
    seen = min(subset or images, images)  # a trial trains on its subset, or the whole split
    trial = budget.trial_epochs(images)
    assert 2 <= trial <= 20
    if 2 < trial < 20:
        assert abs(trial * seen - trial_images) <= seen / 2
    final = budget.final_role({}, images)
    assert final["epochs"] == epochs and final["patience"] == epochs  # whole schedule, no stop


@given(
    images=st.integers(100, 200_000),
    factor=st.floats(0.1, 10, allow_nan=False),
    model=st.sampled_from(["vgg", "resnet", "efficientnet", "hybrid"]),
)
def test_a_models_epoch_scale_multiplies_its_final_epochs_and_no_other(images, factor, model):
    plain = Budget(final_images=300_000, final_max_epochs=40)
    scaled = Budget(final_images=300_000, final_max_epochs=40, final_epoch_scale={model: factor})
    epochs = plain.retrain_epochs(images)
    raw = math.ceil(300_000 / images - 1e-9)  # the unscaled epochs before the bounds
    expected = min(40, max(1, math.ceil(raw * factor - 1e-9)))
    assert scaled.retrain_epochs(images, model) == expected
    assert scaled.final_role({}, images, model)["epochs"] == expected
    assert scaled.final_role({}, images, model)["patience"] == expected
    other = next(m for m in ("vgg", "resnet") if m != model)
    assert scaled.retrain_epochs(images, other) == epochs == scaled.retrain_epochs(images)
    assert scaled.final_role({"epochs": 4}, images, model)["epochs"] == 4  # a trial's own


def test_a_bad_epoch_scale_is_refused_with_the_model_and_factor():
    with pytest.raises(ValueError, match="final_epoch_scale lenet=2"):
        Budget(final_epoch_scale={"lenet": 2})
    with pytest.raises(ValueError, match="final_epoch_scale vgg=0"):
        Budget(final_epoch_scale={"vgg": 0})
    with pytest.raises(ValueError, match="final_epoch_scale vgg=nan"):
        Budget(final_epoch_scale={"vgg": float("nan")})


def test_given_epochs_win_over_the_image_budgets():
    assert Budget(epochs=7, final_epochs=2).trial_epochs(100) == 7
    assert Budget(epochs=7, final_epochs=2).retrain_epochs(100) == 2
    assert Budget().final_role({"epochs": 4}, 2_400)["epochs"] == 4  # a trial's own epochs


def test_budget_counts_the_training_images_at_the_val_fraction_a_run_uses(study_data):
    from experiments.search.plan import StudyPlan
    from experiments.training.runner import load_step_data
    from experiments.training.train import dataset_split

    for step in ("task1-step1", "task1-step2"):
        data = load_step_data(STEPS[step])
        for fraction in (0.2, 0.5):
            split = len(dataset_split(data.train_set, fraction, seed=3)[0])
            assert data.training_images(fraction) == split
            budget = Budget(overrides={"val_fraction": str(fraction)})
            plan = StudyPlan.build(STEPS[step], "vgg", budget).with_data(data)
            assert plan.train_images == split
        assert data.train_images == data.training_images(0.2) < data.training_images(0.1)
    # TRAIN2's grouped split is other data than the image-by-image one an older store saw
    from dataclasses import replace

    ungrouped = replace(data, train_set=replace(data.train_set, groups=None))
    assert data.train_set.groups is not None and ungrouped.data_key != data.data_key
    held_out = load_step_data(STEPS["task2-step3"])  # validated on SELECT2: all of it trains
    assert held_out.training_images(0.5) == len(held_out.train_set)


def test_budget_profiles_pick_the_defaults_by_machine_and_yield_to_given_values(monkeypatch):
    import torch

    from experiments.search.space import PROFILES, default_budget

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = Budget(**PROFILES["cpu"])  # the dataclass, comparing with the defaults at trial fidelity
    assert cpu.baseline == "trial" and Budget().baseline == "final"
    assert default_budget() == cpu  # auto on a machine without CUDA: the CPU defaults
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = default_budget()
    assert gpu.profile == "gpu" and gpu.tags()["budget.profile"] == "gpu"
    assert gpu.trials > Budget().trials and gpu.final_images > Budget().final_images
    assert gpu.retrain_epochs(28_800) == 11  # TRAIN: at least 300,000 images
    assert default_budget("cpu") == cpu  # named: whatever the machine
    assert default_budget("gpu", trials=2, train_subset=0).trials == 2  # given values win
    assert default_budget("gpu", trials=None).trials == PROFILES["gpu"]["trials"]
    with pytest.raises(ValueError, match="--profile tpu"):
        default_budget("tpu")
    with pytest.raises(ValueError, match="--profile tpu"):
        Budget(profile="tpu")


def test_cli_search_with_default_budget_trains_and_reports(study_data, capsys):
    from experiments.cli import main

    assert main(["search", "--step", "task2-step3", "--model", "hybrid", "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "TRAIN3 / TEST2: " in out and "hybrid 0." in out
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == 2
    (final,) = runs_in("task2-step3", "tags.role = 'final'")
    assert 0.0 <= final.data.metrics["TEST2_acc"] <= 1.0  # the default budget trained a final


def test_cli_search_on_a_reuse_step_says_it_trains_nothing(study_data, capsys):
    from experiments.cli import main

    assert main(["search", "--step", "task2-step1", "--model", "hybrid", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "trains nothing" in out and "TRAIN / TEST2: " in out


def test_fixed_step_settings_are_kept_and_not_searched(study_data):
    run_step("task2-mixed", "hybrid", Budget(**{**TINY, "trials": 2}))
    study = optuna.load_study(study_name="task2-mixed/hybrid", storage=make_storage())
    assert all("polarity" not in t.params for t in study.trials)
    runs = runs_in("task2-mixed")
    trained = [r for r in runs if r.data.tags.get("role") in ("trial", "final")]
    assert len(trained) == 3 and all(r.data.params["polarity"] == "to_black" for r in trained)
    final = next(r for r in trained if r.data.tags["role"] == "final")
    assert final.data.tags["train_set"] == "TRAIN_TEST" and "TEST2_acc" in final.data.metrics


def test_a_study_is_never_resumed_on_other_data(study_data, tmp_path, monkeypatch, capsys):
    from synthetic import write_study_data

    from experiments.cli import main

    argv = ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "1", "--epochs", "1",
            "--final-epochs", "1", "--train-subset", "0"]  # fmt: skip
    assert main(argv) == 0
    other = write_study_data(tmp_path / "other", per_class=21)  # one more image per class
    monkeypatch.setenv("DATA_DIR", str(other))
    capsys.readouterr()
    assert main([*argv[:-4], "--trials", "2", *argv[-4:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored on other data" in err[0]
    trials = runs_in("task2-step3", "tags.role = 'trial'")
    assert len(trials) == 1  # nothing trained on the other data


def test_a_study_is_never_continued_at_another_budget_profile(study_data, capsys):
    from experiments.cli import main

    argv = ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "1", "--epochs", "1",
            "--final-epochs", "1", "--train-subset", "0"]  # fmt: skip
    assert main([*argv, "--profile", "cpu"]) == 0
    parent = runs_in("task2-step3", "tags.role = 'study'")
    assert [r.data.tags["budget.profile"] for r in parent] == ["cpu"]
    capsys.readouterr()
    # what `auto` would pick on a machine with CUDA: the study's trials ran at another budget
    assert main([*argv[:-4], "--trials", "2", *argv[-4:], "--profile", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran at the cpu budget profile, now gpu" in err[0]
    assert len(runs_in("task2-step3", "tags.role = 'trial'")) == 1  # nothing trained at gpu


def test_the_profile_follows_the_run_device(monkeypatch):
    import torch

    from experiments.cli import PROFILE_CHOICES
    from experiments.search.space import PROFILES, default_budget

    assert list(PROFILES) == PROFILE_CHOICES[1:] and PROFILE_CHOICES[0] == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_budget(overrides={"device": "cpu"}).profile == "cpu"  # --set device=cpu
    assert default_budget(overrides={"device": "cuda"}).profile == "gpu"
    assert default_budget("gpu", overrides={"device": "cpu"}).profile == "gpu"  # named: as given


def test_when_the_defaults_trial_wins_the_final_is_the_baseline_trained_once(study_data):
    from experiments.reporting.report import collect

    result = run_step(
        "task2-step3", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1)
    )
    finals = runs_in("task2-step3", "tags.role = 'final'")
    assert len(finals) == 1 and finals[0].info.run_id == result.final_run_id
    assert finals[0].data.tags["also_baseline"] == "true"
    assert runs_in("task2-step3", "tags.role = 'baseline'") == []
    cell = collect(("vgg",)).set_index("step").loc["task2-step3"]
    assert cell["baseline_acc"] == cell["searched_acc"] == cell["accuracy"]
    run_step("task2-step3", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1))
    assert len(runs_in("task2-step3", "tags.role != 'study'")) == 2  # resumed: nothing retrained


def test_a_trial_baseline_compares_trial_0_with_the_best_trial_and_trains_no_baseline(
    study_data,
):
    """`baseline=trial` (the cpu and quick budgets): no `baseline` run; the parent names the
    best trial and trial 0, both scored on the evaluation set after the study (metrics and
    predictions logged to the trial runs), and the answer is the final."""
    from experiments.reporting.report import collect

    budget = Budget(trials=2, epochs=1, train_subset=0, final_epochs=1, baseline="trial")
    result = run_step("task2-step3", "vgg", budget)
    assert runs_in("task2-step3", "tags.role = 'baseline'") == []
    (parent,) = runs_in("task2-step3", "tags.role = 'study'")
    tags = parent.data.tags
    assert tags["ab_fidelity"] == "trial" and tags["selected_run"] == result.final_run_id
    trials = {r.data.tags["trial_number"]: r for r in runs_in("task2-step3", "tags.role = 'trial'")}
    assert tags["ab_baseline_run"] == trials["0"].info.run_id  # the defaults
    best = trials[str(result.best_trial)].info.run_id
    assert tags["ab_searched_run"] == best
    client = MlflowClient()
    for run_id in {best, trials["0"].info.run_id}:
        metrics = client.get_run(run_id).data.metrics
        assert "TEST2_acc" in metrics and metrics["TEST2_n"] > 0  # scored after the study
        assert any(a.path == "predictions.npz" for a in client.list_artifacts(run_id))
    assert result.answer_run_id == result.final_run_id
    cell = collect(("vgg",)).set_index("step").loc["task2-step3"]
    baseline = client.get_run(trials["0"].info.run_id).data.metrics["TEST2_acc"]
    assert cell["ab_fidelity"] == "trial" and cell["baseline_acc"] == pytest.approx(baseline)
    assert "also_baseline" not in client.get_run(result.final_run_id).data.tags


def test_the_study_plan_holds_every_role_s_settings_resolved_once(study_data):
    """The plan, built once from step, model, budget and data: the pinned settings (the
    step's and the user's), the training-set size, and the trial, final and baseline
    settings that follow from the budget; a `--set` against the step is refused at build."""
    from experiments.search.plan import StudyPlan

    budget = Budget(trials=3, train_subset=60, overrides={"lr": "0.003"})
    plan = StudyPlan.build(STEPS["task2-mixed"], "vgg", budget)
    assert plan.pinned == {"polarity": "to_black", "lr": 0.003} and plan.train_images == 0
    plan = plan.with_data()
    assert plan.train_images == plan.data.training_images(None) > 0
    params = plan.defaults()
    assert "lr" not in params and "polarity" not in params  # pinned: never searched
    trial = plan.trial(params, 2)
    assert (trial.seed, trial.train_subset, trial.lr) == (budget.seed + 2, 60, 0.003)
    assert trial.epochs == budget.trial_epochs(plan.train_images)
    final = plan.final(params)
    assert (final.train_subset, final.epochs) == (0, budget.retrain_epochs(plan.train_images))
    assert plan.baseline() == final and final.polarity == "to_black"
    assert plan.key(final) == plan.key(plan.baseline()) != plan.key(trial)
    with pytest.raises(ValueError, match="contradicts step task2-mixed"):
        StudyPlan.build(STEPS["task2-mixed"], "vgg", Budget(overrides={"polarity": "keep"}))
    # a model's epoch scale reaches its final and baseline, and no other model's
    from dataclasses import replace

    three = replace(budget, final_images=3 * plan.train_images, final_epoch_scale={"vgg": 2})
    doubled = StudyPlan.build(STEPS["task2-mixed"], "vgg", three).with_data(plan.data)
    assert doubled.final(params).epochs == doubled.baseline().epochs == 6
    other = StudyPlan.build(STEPS["task2-mixed"], "resnet", three).with_data(plan.data)
    assert other.final(other.defaults()).epochs == 3


def test_a_study_from_before_data_keys_is_not_resumed(study_data, capsys):
    from experiments.cli import main

    store.init()
    old = load_or_create_study("task2-step3", "vgg", make_storage(), Budget(**TINY))
    old.ask()  # a trial from a version that recorded no data key
    argv = ["search", "--step", "task2-step3", "--model", "vgg", "--trials", "2", "--epochs", "1",
            "--final-epochs", "1", "--train-subset", "0"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    assert "a study from before data keys" in capsys.readouterr().err


def test_a_retrain_step_refuses_a_source_study_scored_on_other_data(
    study_data, tmp_path, monkeypatch
):
    from synthetic import write_study_data

    run_step("task2-step3", "vgg", Budget(trials=1, epochs=1, train_subset=0, final_epochs=1))
    monkeypatch.setenv("DATA_DIR", str(write_study_data(tmp_path / "other", per_class=21)))
    with pytest.raises(ValueError, match="scored on other data"):
        run_step("task2-step3-long", "vgg", Budget(trials=1, epochs=1, train_subset=0))
    assert runs_in("task2-step3-long") == []


def test_a_study_from_before_profiles_counts_as_cpu():
    from types import SimpleNamespace

    from experiments.search.driver import check_profile

    recorded: dict[str, str] = {}
    old = SimpleNamespace(
        study_name="s", user_attrs={}, trials=[object()], set_user_attr=recorded.__setitem__
    )
    check_profile(old, Budget())  # its trials ran at the only budget there was: cpu
    with pytest.raises(ValueError, match="ran at the cpu budget profile, now gpu"):
        check_profile(old, Budget(profile="gpu"))
    new = SimpleNamespace(
        study_name="s", user_attrs={}, trials=[], set_user_attr=recorded.__setitem__
    )
    check_profile(new, Budget(profile="gpu"))
    assert recorded == {"budget_profile": "gpu"}


def test_one_search_process_runs_a_chain_in_order_and_stops_at_a_failed_study(
    study_data, monkeypatch, capsys
):
    import experiments.search.driver as driver
    from experiments.cli import main

    ran = []
    real = driver.run_step

    def recorded(step, model, *args, **kwargs):
        ran.append((step, model))
        return real(step, model, *args, **kwargs)

    monkeypatch.setattr(driver, "run_step", recorded)
    chain = ["search", "--step", "task2-step3", "--step", "task2-step2", "--model", "hybrid"]
    assert main([*chain, "--trials", "1", "--epochs", "1", "--final-epochs", "1"]) == 0
    assert ran == [("task2-step3", "hybrid"), ("task2-step2", "hybrid")]  # source first
    assert runs_in("task2-step2", "tags.role = 'final'")  # warm-started from the first

    def broken(step, model, *args, **kwargs):
        ran.append((step, model))
        raise ValueError(f"{step}: broken on purpose")

    ran.clear()
    monkeypatch.setattr(driver, "run_step", broken)
    assert main([*chain, "--trials", "1"]) == 2
    assert ran == [("task2-step3", "hybrid")]  # the chain stopped: its dependant never ran
