"""Ensembles and TTA in the report: members chosen by validation accuracy, recorded, scored."""

from __future__ import annotations

import csv

import pytest
import torch

from experiments.reporting.report import build_report
from experiments.search.driver import run_step
from experiments.search.space import Budget

TINY = dict(trials=1, epochs=2, train_subset=0, final_epochs=2, warmup_epochs=0)


def test_report_adds_ensemble_rows_with_their_members(study_data, tmp_path):
    results = {m: run_step("task2-step3", m, Budget(**TINY)) for m in ("vgg", "resnet")}
    out, _ = build_report(tmp_path / "reports", ensemble_k=2, tta=True)
    rows = list(csv.DictReader((out / "ensembles.csv").read_text().splitlines()))
    by_name = {(r["ensemble"], r["tta"]): r for r in rows}
    best1 = by_name[("task2-step3: best 1", "False")]
    best2 = by_name[("task2-step3: best 2", "True")]
    vals = {m: r.final_metrics["best_val_acc"] for m, r in results.items()}
    winner = max(vals, key=lambda m: (vals[m], [-ord(c) for c in m]))
    assert best1["members"] == f"task2-step3/{winner}:{results[winner].final_run_id}"
    assert best2["k"] == "2" and all(r.final_run_id in best2["members"] for r in results.values())
    everything = by_name[("Task 2 labelled steps: all", "False")]
    assert everything["k"] == "2"  # only task2-step3 has runs here
    best1_run = results[winner].final_run_id
    from data_tools import load_split
    from experiments.training.checkpoint import load_checkpoint

    test2 = load_split("TEST2", study_data)
    predicted = load_checkpoint(best1_run).predict(test2.images)
    single = float((predicted == test2.labels).float().mean())
    assert float(best1["accuracy"]) == pytest.approx(single)  # a 1-member ensemble is that model
    text = (out / "comparison.md").read_text()
    assert "## Ensembles and test-time augmentation (TEST2)" in text
    assert "## Task 2: reaching 0.99 on TEST2" in text
    assert "## Task 1: findings and advice" in text  # says how to fill it


def test_tta_views_shift_by_one_pixel_and_keep_the_background():
    from experiments.analysis.ensemble import shifted_views

    image = torch.ones(1, 1, 28, 28)  # white background
    image[0, 0, 10, 12] = 0.0  # one dark stroke pixel at row 10, column 12
    views = shifted_views(image, tta=True)
    assert len(views) == 5 and len(shifted_views(image, tta=False)) == 1
    strokes = sorted(tuple(torch.nonzero(v[0, 0] < 0.5)[0].tolist()) for v in views)
    assert strokes == [(9, 12), (10, 11), (10, 12), (10, 13), (11, 12)]
    for view in views:  # border pixels repeated: the background stays white
        assert float(view[0, 0, :, 0].min()) == 1.0 and float(view[0, 0, 0, :].min()) == 1.0


class _Probe(torch.nn.Module):
    """Logits that only see whether the stroke pixel sits in column 13 (a one-pixel shift right)."""

    def forward(self, x):
        right = (x[:, 0, 10, 13] < 0.5).float()
        return torch.stack([right, 1 - right, *[torch.zeros_like(right)] * 4], 1) * 50


def test_ensemble_probabilities_average_over_the_tta_views():
    from experiments.analysis.ensemble import probabilities
    from experiments.core.preprocess import Preprocessing
    from experiments.training.checkpoint import Loaded

    image = torch.ones(1, 1, 28, 28)
    image[0, 0, 10, 12] = 0.0
    prep = Preprocessing("keep", "none", "none", 0.85, 0.7, mean=0.0, std=1.0)
    loaded = Loaded(_Probe(), prep, {})
    plain = probabilities(loaded, image, tta=False)
    tta = probabilities(loaded, image, tta=True)
    assert plain[0, 0] == pytest.approx(0.0, abs=1e-6)  # unshifted: never class 0
    assert tta[0, 0] == pytest.approx(1 / 5, abs=1e-6)  # one of five views moves it right


def test_the_all_group_holds_every_labelled_task2_training_step():
    from experiments.analysis.ensemble import TASK2_LABELLED
    from experiments.core.steps import STEPS

    expected = {
        s.name
        for s in STEPS.values()
        if s.name.startswith("task2") and s.kind != "reuse" and s.train_set != "TRAIN"
    }
    assert set(TASK2_LABELLED) == expected
