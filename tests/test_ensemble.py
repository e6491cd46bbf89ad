"""Ensembles and TTA in the report: members chosen by validation accuracy, recorded, scored."""

from __future__ import annotations

import csv

import torch

from experiments.report import build_report
from experiments.search import Budget, run_study

TINY = dict(trials=1, epochs=2, train_subset=0, final_epochs=2, warmup_epochs=0)


def test_report_adds_ensemble_rows_with_their_members(study_data, tmp_path):
    results = {m: run_study("task2-step3", m, Budget(**TINY)) for m in ("vgg", "resnet")}
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
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
    text = (out / "comparison.md").read_text()
    assert "## Ensembles and test-time augmentation (TEST2)" in text
    assert "## Task 2: reaching 0.99 on TEST2" in text
    assert "## Task 1: findings and advice" in text  # says how to fill it


def test_tta_shifts_by_one_pixel_and_keeps_the_background():
    import kornia.geometry.transform as KT

    image = torch.ones(1, 1, 28, 28)  # white background
    image[0, 0, 10, 12] = 0.0  # one dark stroke pixel at row 10, column 12
    moved = KT.translate(
        image, torch.tensor([[1.0, 0.0]]), padding_mode="border", align_corners=True
    )
    assert torch.nonzero(moved[0, 0] < 0.5).tolist() == [[10, 13]]  # dx = +1 moves right
    assert float(moved.max()) == 1.0 and float(moved[0, 0, :, 0].min()) == 1.0  # border repeated


def test_the_all_group_holds_every_labelled_task2_training_step():
    from experiments.ensemble import TASK2_LABELLED
    from experiments.steps import STEPS

    expected = {
        s.name
        for s in STEPS.values()
        if s.name.startswith("task2") and not s.reuses and s.train_set != "TRAIN"
    }
    assert set(TASK2_LABELLED) == expected
