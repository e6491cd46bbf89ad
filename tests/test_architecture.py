"""The architecture's promises: a new model is one registry line, and one module queries runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import runs_in
from torch import nn

import models
from experiments.__main__ import main
from experiments.report import collect

ROOT = Path(__file__).resolve().parents[1]


class Throwaway(nn.Module):
    """A model the project has never seen: one conv, pooling, a linear head."""

    TITLE = "Throwaway"
    SEARCH_SPACE = {"width": ("categorical", (4, 6))}

    def __init__(self, num_classes: int = 6, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def test_a_model_registered_at_run_time_trains_searches_and_reports(
    study_data, monkeypatch, tmp_path, capsys
):
    monkeypatch.setitem(models.MODELS, "throwaway", Throwaway)  # the one registry line
    train = ["train", "--step", "task2-step3", "--model", "throwaway", "--epochs", "1"]
    assert main(train) == 0
    search = ["search", "--step", "task2-step3", "--model", "throwaway", "--trials", "1"]
    assert main([*search, "--epochs", "1", "--final-epochs", "1", "--train-subset", "0"]) == 0
    assert main(["report", "--out", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert "throwaway" in out
    final = runs_in("task2-step3", "tags.role = 'final'")
    assert len(final) == 1 and final[0].data.params["width"] in ("4", "6")
    cells = collect()
    cell = cells[(cells["step"] == "task2-step3") & (cells["model"] == "throwaway")].iloc[0]
    assert cell["run_id"] == final[0].info.run_id and pd.notna(cell["accuracy"])
    text = (tmp_path / "reports" / "comparison.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| trained / evaluated"))
    assert "Throwaway" in header  # a column of its own, titled from the model


def test_only_the_results_layer_queries_runs():
    query = re.compile(r"search_runs\(|\.get_run\(|search_experiments\(|get_metric_history\(")
    offenders = [
        path.relative_to(ROOT).as_posix()
        for folder in ("experiments", "data_tools", "models")
        for path in (ROOT / folder).glob("*.py")
        if path.name != "results.py" and query.search(path.read_text())
    ]
    assert offenders == []


def test_every_declared_step_is_a_make_target():
    import subprocess

    from experiments.steps import STEPS

    for step in STEPS:
        dry = subprocess.run(
            ["make", "-n", step, "MODELS=vgg"], cwd=ROOT, capture_output=True, text=True
        )
        assert dry.returncode == 0, dry.stderr
        assert f"--step {step}" in dry.stdout or step == "task2-transfer"


def test_make_reproduce_lanes_cover_every_registered_model_once():
    from models import MODELS

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    all_models = re.search(r"^ALL_MODELS := ([^#\n]*)", makefile, re.M).group(1).split()
    lanes = re.search(r"^LANES \?= ([^#\n]*)", makefile, re.M).group(1).split()
    in_lanes = [model for lane in lanes for model in lane.split("+")]
    assert sorted(all_models) == sorted(MODELS) == sorted(in_lanes)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_reproduce_runs_each_lane_in_order_and_keeps_only_models(tmp_path):
    """`make reproduce` with a stand-in interpreter that logs each call: every lane runs its
    steps one after another (never two of a lane's steps at once), and MODELS filters lanes."""
    trace = tmp_path / "trace"
    fake = tmp_path / "fakepy"
    fake.write_text(
        f'#!/bin/sh\necho "start $*" >> {trace}\n'
        # the efficientnet+resnet lane is the slow one: the other ends first, freeing its job slot
        'case "$*" in *efficientnet*) sleep 0.6;; *) sleep 0.1;; esac\n'
        f'echo "end $*" >> {trace}\n'
    )
    fake.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()
    root = Path(__file__).resolve().parents[1]

    def run(*extra: str) -> list[str]:
        trace.unlink(missing_ok=True)
        command = ["make", "-s", "-C", str(root), "reproduce", f"PY={fake}", f"STAMP={stamp}"]
        subprocess.run([*command, *extra], check=True, capture_output=True, timeout=120)
        return trace.read_text().splitlines()

    lines = run()
    searches = [line for line in lines if " search " in line]
    running: dict[str, str] = {}
    for line in searches:
        kind, lane = line.split()[0], " ".join(re.findall(r"--model (\S+)", line))
        if kind == "start":
            assert lane not in running, f"{line} while {running[lane]}"
            running[lane] = line
        else:
            running.pop(lane)
    assert {" ".join(re.findall(r"--model (\S+)", s)) for s in searches} == {
        "vgg hybrid",
        "efficientnet resnet",
    }
    only = [
        line for line in run("MODELS=resnet") if line.startswith("start") and " search " in line
    ]
    assert only and all(re.findall(r"--model (\S+)", line) == ["resnet"] for line in only)
