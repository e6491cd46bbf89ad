"""The Model Registry: champions promoted once, loaded by alias, served over REST."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from synthetic import permute_labels

from data_tools import load_split
from experiments.analysis.detectors import MODEL_DETECTORS
from experiments.core import config
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.serving import registry
from experiments.serving.registry import ALIAS, accuracy_on, choose, promote, task2_candidates
from experiments.tracking import store

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=2, warmup_epochs=0)


@pytest.fixture
def studies(study_data):
    for model in ("vgg", "hybrid"):
        run_step("task2-step3", model, Budget(**TINY))
    run_step("task1-step1", "resnet", Budget(**TINY))
    return study_data


def test_promote_registers_each_champion_once_and_loads_by_alias(studies, monkeypatch):
    real_candidates = registry.task2_candidates
    monkeypatch.setattr(  # single runs only, so that the champion is one known run
        registry,
        "task2_candidates",
        lambda: [c for c in real_candidates() if len(c.runs) == 1 and not c.tta],
    )
    with monkeypatch.context() as old_version:  # a version whose run logged no numbers
        old_version.setattr(registry, "evaluation_metrics", lambda champion: {})
        task2, version, created = promote(2)
    assert len(task2.runs) == 1 and not task2.tta
    assert created and version == "1"
    again, version_again, created_again = promote(2)  # logs the numbers it lacked
    assert not created_again and version_again == "1" and again.run_id == task2.run_id
    client = MlflowClient()
    registered = client.get_model_version_by_alias("glyph-task2", ALIAS)
    assert registered.tags["source_run"] == ",".join(task2.run_ids)
    assert registered.tags["selection_rule"] == registry.RULES[2]
    assert registered.tags["candidate"] == task2.label
    assert "data.TEST2_fingerprint" in registered.tags
    model = mlflow.pyfunc.load_model(f"models:/glyph-task2@{ALIAS}")
    test2 = load_split("TEST2", studies)
    frame = model.predict(test2.images.numpy())
    accuracy = float((frame["predicted"].to_numpy() - 1 == test2.labels.numpy()).mean())
    assert accuracy == accuracy_on(task2, "TEST2")  # the registered model is the candidate
    promote_run = client.get_run(client.get_model_version("glyph-task2", version).run_id)
    assert accuracy == promote_run.data.metrics["TEST2_acc"]  # and its logged number, exactly
    # and reproduces its training run's logged number exactly, and its checkpoint's
    # probabilities image by image
    assert accuracy == client.get_run(task2.run_id).data.metrics["TEST2_acc"]
    from experiments.training.checkpoint import load_checkpoint
    from experiments.training.inference import probabilities

    expected = probabilities(load_checkpoint(task2.run_id), test2.images).numpy()
    served = frame[[f"prob_{k}" for k in range(1, 7)]].to_numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)

    task1, _, _ = promote(1)
    assert task1.detector["name"] in MODEL_DETECTORS
    frame = mlflow.pyfunc.load_model(f"models:/glyph-task1@{ALIAS}").predict(
        load_split("TEST", studies).images.numpy()
    )
    assert {"detector_score", "unknown"} <= set(frame.columns)
    flagged = frame["detector_score"].to_numpy() > task1.detector["threshold"]
    assert (frame["unknown"].to_numpy() == flagged).all()


def test_the_task1_detector_is_fitted_once_per_run_data_and_recipe(studies, monkeypatch, capsys):
    """The report and every promote ask for the detector: the second ask reads the cache; a
    damaged entry or another recipe fits it again."""
    import torch

    run_id = choose(1).run_id  # fits and caches it
    first = registry.detector_of(run_id)
    fitted = []
    real_fit = registry.fit_detector
    monkeypatch.setattr(registry, "fit_detector", lambda *a: fitted.append(a) or real_fit(*a))
    again = registry.detector_of(run_id)
    assert fitted == [] and again["name"] == first["name"]
    assert again["threshold"] == first["threshold"]
    assert all(torch.equal(again[k], v) for k, v in first.items() if isinstance(v, torch.Tensor))
    (entry,) = (config.cache_dir() / "detectors").glob("*.pt")
    entry.write_bytes(b"not a torch file")
    assert registry.detector_of(run_id)["threshold"] == first["threshold"] and len(fitted) == 1
    assert "unreadable cached detector" in capsys.readouterr().err
    assert torch.load(entry, weights_only=True)["threshold"] == first["threshold"]  # replaced
    monkeypatch.setattr(registry, "DETECTOR_RECIPE", registry.DETECTOR_RECIPE + 1)
    registry.detector_of(run_id)
    assert len(fitted) == 2 and len(list(entry.parent.glob("*.pt"))) == 2


def test_task1_detector_is_chosen_on_train_alone_and_any_kind_ships(studies, monkeypatch):
    from experiments.analysis.detectors import score_shipped
    from experiments.training.checkpoint import load_checkpoint

    seen, real = [], registry.load_split
    monkeypatch.setattr(
        registry, "load_split", lambda name, *a, **k: seen.append(name) or real(name, *a, **k)
    )
    champion = choose(1)
    assert set(seen) == {"TRAIN"}  # the detector and its threshold never read TEST or TEST2
    detector = champion.detector
    assert set(detector["proxy_auroc"]) == set(MODEL_DETECTORS)
    # the rule, on scripted proxy AUROCs (one per detector, in MODEL_DETECTORS order), for a
    # model that keeps the polarity (so that the proxy can inform)
    real_load = registry.load_checkpoint

    def keeps_polarity(run_id):
        loaded = real_load(run_id)
        loaded.checkpoint["config"]["polarity"] = "keep"
        return loaded

    for scripted, expected, rule in (
        ([0.55, 0.9, 0.7][: len(MODEL_DETECTORS)], MODEL_DETECTORS[1], "proxy AUROC"),
        ([0.5] * len(MODEL_DETECTORS), registry.DECLARED_DETECTOR, "declared default"),
    ):
        with monkeypatch.context() as patch:
            values = iter(scripted)
            patch.setattr(registry, "roc_auc_score", lambda truth, score, v=values: next(v))
            patch.setattr(registry, "load_checkpoint", keeps_polarity)
            picked = registry.fit_detector(champion.run_id, real("TRAIN", studies), 6000)
        assert picked["name"] == expected and picked["chosen_by"].startswith(rule)

    def to_black(run_id):  # a model that turns every image black-background
        loaded = real_load(run_id)
        loaded.checkpoint["config"]["polarity"] = "to_black"
        return loaded

    with monkeypatch.context() as patch:
        patch.setattr(registry, "load_checkpoint", to_black)
        blind = registry.fit_detector(champion.run_id, real("TRAIN", studies), 6000)
    assert blind["name"] == registry.DECLARED_DETECTOR
    assert blind["chosen_by"].startswith("declared default")
    monkeypatch.setattr(registry, "MODEL_DETECTORS", ("mahalanobis",))  # the hardest to ship
    maha, _, _ = promote(1)
    assert maha.detector["name"] == "mahalanobis"
    test = real("TEST", studies)
    frame = mlflow.pyfunc.load_model(f"models:/glyph-task1@{ALIAS}").predict(test.images.numpy())
    expected = score_shipped(maha.detector, load_checkpoint(maha.run_id), test.images).numpy()
    assert np.allclose(frame["detector_score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    measured = registry.task1_measures(maha)
    assert measured["coverage"] == pytest.approx(1 - frame["unknown"].mean())


def test_task2_candidates_follow_the_fixed_recipe_and_an_ensemble_registers(studies, monkeypatch):
    candidates = {c.label: c for c in task2_candidates()}
    singles = ["task2-step3/vgg", "task2-step3/hybrid"]
    ensemble = "task2-step3: all 2 answers"
    expected = {*singles, ensemble}
    assert set(candidates) == expected | {f"{name} (TTA)" for name in expected}
    client = MlflowClient()
    for name in singles:  # a final's best_val_acc is its SELECT2 accuracy
        single = candidates[name]
        logged = client.get_run(single.run_id).data.metrics["best_val_acc"]
        assert single.selection_acc == pytest.approx(logged, abs=1e-6)
    best = choose(2)
    ties = registry.tied(list(candidates.values()))
    top = max(c.selection_acc for c in candidates.values())
    assert best.label == ties.iloc[0]["name"] and top in ties["select_acc"].tolist()
    assert (ties["select_acc"] >= ties["select_acc_low"].min()).all()
    table = registry.candidates_table("TEST2")
    assert len(table) == len(candidates) and table["champion"].tolist() == [True] + [False] * 5
    assert table.loc[0, "candidate"] == best.label
    assert table.loc[0, "TEST2_acc (measured after)"] == accuracy_on(best, "TEST2")
    # the report's lean table: TTA rows other than the champion are not measured on TEST2
    lean = registry.candidates_table("TEST2", tta=False)
    column = "TEST2_acc (measured after)"
    skipped = lean["tta"] & ~lean["champion"]
    assert skipped.any() and lean.loc[skipped, column].isna().all()
    assert lean.loc[~skipped, column].tolist() == table.loc[~skipped, column].tolist()
    chosen = candidates[f"{ensemble} (TTA)"]
    assert chosen.parameters == sum(candidates[name].parameters for name in singles)
    monkeypatch.setattr(registry, "choose", lambda task: chosen)
    promoted, _, created = promote(2)
    assert created and promoted is chosen
    model = mlflow.pyfunc.load_model(f"models:/glyph-task2@{ALIAS}")
    test2 = load_split("TEST2", studies)
    frame = model.predict(test2.images.numpy())
    accuracy = float((frame["predicted"].to_numpy() - 1 == test2.labels.numpy()).mean())
    assert accuracy == accuracy_on(chosen, "TEST2")
    registered = client.get_model_version_by_alias("glyph-task2", ALIAS)
    assert registered.tags["members"] == "2" and registered.tags["tta"] == "true"


def test_the_task2_tie_break_reads_no_evaluation_label(studies, monkeypatch):
    """The whole Task 2 rule (candidates, tie set, tie-break) runs with the evaluation sets out
    of reach: loading TEST2 (or TEST) fails, and the champion is the same."""
    expected = choose(2).label
    real_load = registry.load_split

    def selection_only(name, *args, **kwargs):
        if name in ("TEST2", "TEST"):
            raise AssertionError(f"the Task 2 rule read {name}")
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(registry, "load_split", selection_only)
    assert choose(2).label == expected


@pytest.mark.slow  # trains the tiny studies again, twice
def test_permuting_evaluation_labels_changes_no_champion(studies, monkeypatch, tmp_path):
    first = {task: choose(task) for task in (1, 2)}
    # Task 2 evaluates on TEST2 (its labels are never read to choose): permute them, retrain
    permute_labels(studies / "TEST2")
    monkeypatch.setenv("MLRUNS_DIR", str(tmp_path / "mlruns-test2-permuted"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache-test2-permuted"))
    for model in ("vgg", "hybrid"):
        run_step("task2-step3", model, Budget(**TINY))
    second = choose(2)
    assert second.label == first[2].label and second.selection_acc == first[2].selection_acc
    # Task 1 evaluates on TEST (task1-step1 trains on TRAIN only): permute TEST too, retrain
    permute_labels(studies / "TEST")
    monkeypatch.setenv("MLRUNS_DIR", str(tmp_path / "mlruns-test-permuted"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache-test-permuted"))
    run_step("task1-step1", "resnet", Budget(**TINY))
    task1 = choose(1)
    assert task1.label == first[1].label and task1.selection_acc == first[1].selection_acc
    assert task1.detector["name"] == first[1].detector["name"]
    assert task1.detector["threshold"] == first[1].detector["threshold"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_champion_answers_over_rest(studies, tmp_path):
    champion, _, _ = promote(2)
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow starts uvicorn from PATH
    path = bin_dir + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "MLFLOW_TRACKING_URI": config.tracking_uri(), "PATH": path}
    mlflow_cli = os.path.join(bin_dir, "mlflow")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/glyph-task2@{ALIAS}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        images = load_split("TEST2", studies).images[:16].numpy()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            served = json.loads(response.read())["predictions"]
        store.init()
        local = mlflow.pyfunc.load_model(f"models:/glyph-task2@{ALIAS}").predict(images)
        assert [row["predicted"] for row in served] == local["predicted"].tolist()
    except Exception:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-3000:])
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_recipe_step_trains_its_settings_once_and_joins_the_task2_field(
    study_data, monkeypatch
):
    import dataclasses

    from data_tools import SELECTION
    from experiments.core import steps

    recipe = steps.STEPS["task2-recipe"]
    short = {**dict(recipe.settings), "epochs": 2, "patience": 2}
    monkeypatch.setitem(
        steps.STEPS,
        "task2-recipe",
        dataclasses.replace(
            recipe, settings=tuple(short.items()), model_settings=(("hybrid", (("width", 8),)),)
        ),
    )
    first = run_step("task2-recipe", "hybrid", Budget(**TINY))
    again = run_step("task2-recipe", "hybrid", Budget(**TINY))  # found, not trained again
    assert again.final_run_id == first.final_run_id
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("task2-recipe").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["recipe"] == "true" and run.data.tags["role"] == "final"
    assert "retrain_of_trial" not in run.data.tags
    params = run.data.params
    assert (params["optimizer"], params["width"], params["epochs"]) == ("adamw", "8", "2")
    assert params["split.val_set"] == SELECTION  # validated on SELECT2 like every Task 2 step
    assert "task2-recipe/hybrid" in {c.label for c in task2_candidates()}
    with pytest.raises(ValueError, match="task2-recipe has no recipe for vgg"):
        run_step("task2-recipe", "vgg", Budget(**TINY))


def test_promote_skips_a_task_without_studies_and_ends_orphaned_promote_runs(study_data, capsys):
    from experiments.cli import main

    run_step("task2-step3", "hybrid", Budget(**TINY))  # Task 2 only: no task1-step1 study
    store.init()
    client = MlflowClient()
    orphan = client.create_run(store.experiment_id(registry.REGISTRY_EXPERIMENT))  # kill -9'd
    assert main(["promote"]) == 0
    out = capsys.readouterr().out
    assert "skipped Task 1: no task1-step1 study has finished" in out and "glyph-task2 v1" in out
    ended = client.get_run(orphan.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["interrupted"] == "true"
    assert main(["promote", "--task", "1"]) == 2  # asked for by name: an error


def test_two_promotes_at_once_register_one_version(studies):
    env = {**os.environ}
    command = [sys.executable, "-m", "experiments", "promote", "--task", "2"]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    versions = MlflowClient().search_model_versions("name = 'glyph-task2'")
    assert len(versions) == 1  # the second saw the first's version by its promotion key
    said = b"".join(o[0] for o in outs)
    assert said.count(b"(new version)") == 1 and said.count(b"(already registered)") == 1


def test_promote_refuses_candidates_selected_on_other_data(studies, tmp_path, monkeypatch, capsys):
    """DATA_DIR pointing at other data than the studies were selected on: one line, nothing
    registered, for either task."""
    import shutil

    from experiments.cli import main

    other = tmp_path / "other"
    shutil.copytree(studies, other)
    permute_labels(other / "TEST")  # SELECT2 (TEST's white half) now differs
    permute_labels(other / "TRAIN")  # and so does TRAIN, Task 1's selection data
    monkeypatch.setenv("DATA_DIR", str(other))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "other-cache"))
    for task in ("1", "2"):
        capsys.readouterr()
        assert main(["promote", "--task", task]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: promote: ") and "was selected on" in last
        assert ("TRAIN" if task == "1" else "SELECT2") in last and str(other) in last
    assert MlflowClient().search_registered_models() == []


def test_seed_runs_join_the_answers_as_one_more_candidate_that_registers(studies, monkeypatch):
    """With `make seeds` run, the recipe adds one candidate: every answer with its seed runs,
    chosen like the rest on SELECT2, and registrable like any ensemble."""
    from experiments.search.seeds import run_seeds

    before = {c.label for c in task2_candidates()}
    made = [run.run_id for model in ("vgg", "hybrid") for run in run_seeds("task2-step3", model, 1)]
    candidates = {c.label: c for c in task2_candidates()}
    label = "all 2 Task 2 answers and their 2 seed runs"
    assert set(candidates) == before | {label, f"{label} (TTA)"}
    together = candidates[label]
    answers = set(candidates["task2-step3: all 2 answers"].run_ids)
    assert set(together.run_ids) == answers | set(made) and len(together.run_ids) == 4
    ties = registry.tied(list(candidates.values()))
    if label in set(ties["name"]):  # tied: the most members wins
        assert choose(2).label in (label, f"{label} (TTA)")
    monkeypatch.setattr(registry, "choose", lambda task: together)
    promoted, _, created = promote(2)
    assert created and promoted is together
    registered = MlflowClient().get_model_version_by_alias("glyph-task2", ALIAS)
    assert registered.tags["members"] == "4"
