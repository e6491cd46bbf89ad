"""Predictions logged once: what a run logs equals a full re-prediction, and readers use it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import runs_in

from data_tools import load_split
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.serving import registry
from experiments.training import inference, predictions
from experiments.training.checkpoint import load_checkpoint
from experiments.training.inference import ProbabilityCache, probabilities

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=1)


def test_logged_predictions_equal_a_full_re_prediction(study_data, tmp_path):
    run_step("task2-step3", "vgg", Budget(**TINY))
    (final,) = runs_in("task2-step3", "tags.role = 'final'")
    run_id = final.info.run_id
    logged = predictions.logged(run_id)
    loaded = load_checkpoint(run_id)
    test2 = load_split("TEST2", study_data, tmp_path / "cache")
    select2 = load_split("SELECT2", study_data, tmp_path / "cache")
    expected = {
        predictions.key(test2.fingerprint, False): probabilities(loaded, test2.images),
        predictions.key(select2.fingerprint, False): probabilities(loaded, select2.images),
        predictions.key(select2.fingerprint, True): probabilities(loaded, select2.images, True),
        # the study's answer (trial 0 won, so the final is also the baseline): TTA on TEST2
        predictions.key(test2.fingerprint, True): probabilities(loaded, test2.images, True),
    }
    assert final.data.tags["selected"] == "true"
    assert set(logged) == set(expected)  # eval sets without TTA; SELECT2 both ways
    for name, probs in expected.items():
        np.testing.assert_allclose(logged[name], probs.numpy(), rtol=1e-5, atol=1e-6)
    assert final.data.metrics["parameters"] == sum(p.numel() for p in loaded.model.parameters())


def test_readers_use_the_logged_predictions_and_not_other_datas(study_data, tmp_path, monkeypatch):
    run_step("task2-step3", "hybrid", Budget(**TINY))
    (final,) = runs_in("task2-step3", "tags.role = 'final'")
    test2 = load_split("TEST2", study_data, tmp_path / "cache")
    cache = ProbabilityCache(test2.images, load_checkpoint, test2.fingerprint)
    with monkeypatch.context() as patch:  # nothing may be predicted: it is all logged
        patch.setattr(inference, "probabilities", lambda *a, **k: pytest.fail("re-predicted"))
        logged = cache(final.info.run_id, False)
        candidates = registry.task2_candidates()
    assert cache.predicted == 0 and len(candidates) == 2  # the answer, with and without TTA
    other = ProbabilityCache(test2.images, load_checkpoint, test2.fingerprint + "|other data")
    again = other(final.info.run_id, False)  # another fingerprint: predicted, not read
    assert other.predicted == 1
    np.testing.assert_allclose(again.numpy(), logged.numpy(), rtol=1e-5, atol=1e-6)


def test_a_tta_champion_is_measured_from_the_answers_logged_views(study_data, monkeypatch):
    """The Task 2 champion candidates include TTA ensembles of study answers; measuring one
    on TEST2 after the choice reads the answers' logged TTA probabilities, and a damaged
    file of them is predicted again rather than trusted."""
    from mlflow.tracking import MlflowClient

    for model in ("vgg", "hybrid"):
        run_step("task2-step3", model, Budget(**TINY))
    candidates = registry.task2_candidates()
    ensemble = next(c for c in candidates if c.tta and len(c.runs) == 2)
    with monkeypatch.context() as patch:
        patch.setattr(inference, "probabilities", lambda *a, **k: pytest.fail("re-predicted"))
        measured = registry.accuracy_on(ensemble, "TEST2")
    test2 = load_split("TEST2", study_data)
    full = [probabilities(load_checkpoint(r), test2.images, True) for r in ensemble.run_ids]
    assert measured == inference.ensemble_accuracy(full, test2.labels)

    run_id = ensemble.run_ids[0]  # its answer file damaged: predicted, same number
    folder = MlflowClient().download_artifacts(run_id, predictions.ANSWER_ARTIFACT)
    with open(folder, "r+b") as damaged:
        damaged.write(b"garbage")
    MlflowClient().log_artifact(run_id, folder)
    cache = ProbabilityCache(test2.images, load_checkpoint, test2.fingerprint)
    assert cache.accuracy(ensemble.run_ids, True, test2.labels) == measured
    assert cache.predicted == 1


def test_a_recipe_answer_logs_its_tta_views_too(study_data):
    run_step("task2-recipe", "hybrid", Budget(**TINY))
    (final,) = runs_in("task2-recipe", "tags.role = 'final'")
    test2 = load_split("TEST2", study_data)
    logged = predictions.logged(final.info.run_id, predictions.ANSWER_ARTIFACT)
    assert list(logged) == [predictions.key(test2.fingerprint, True)]


def test_every_scored_run_logs_its_compute_and_the_study_its_total(study_data, tmp_path):
    from experiments.reporting.report import build_report
    from experiments.training.inference import forward_flops

    run_step("task2-step3", "vgg", Budget(**{**TINY, "trials": 2}))
    runs = runs_in("task2-step3")
    children = [r for r in runs if r.data.tags.get("role") in ("trial", "final", "baseline")]
    (parent,) = [r for r in runs if r.data.tags.get("role") == "study"]
    (final,) = [r for r in children if r.data.tags["role"] == "final"]
    m = final.data.metrics
    per_image = forward_flops(load_checkpoint(final.info.run_id).model)
    assert m["flops_per_image"] == per_image > 0
    assert m["train_flops"] == 3 * per_image * m["epochs_run"] * int(
        final.data.params["split.train_images"]
    )
    assert m["total_flops"] == m["train_flops"] + m["eval_flops"]
    (answer,) = [r for r in children if r.info.run_id == parent.data.tags["selected_run"]]
    answer_per_image = forward_flops(load_checkpoint(answer.info.run_id).model)
    assert answer.data.metrics["answer_flops"] == 5 * answer_per_image * 120  # 5 views of TEST2
    total = sum(r.data.metrics["total_flops"] for r in children)
    total += answer.data.metrics["answer_flops"]
    assert parent.data.metrics["study_flops"] == pytest.approx(total)
    _, cells = build_report(tmp_path / "report")
    cell = cells.set_index(["step", "model"]).loc[("task2-step3", "vgg")]
    assert cell["study_tflop"] == pytest.approx(total / 1e12)
