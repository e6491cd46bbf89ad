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


def test_make_reproduce_covers_every_registered_model_and_its_sources():
    """ALL_MODELS is the registry, STUDY_ORDER names each model once, and the Makefile's
    AFTER_<step> (which study a job waits for) is what experiments/steps.py declares: the
    warm-start source, or the study a reuse step reads; each CHAIN_ (one job of make
    reproduce) runs a source before the steps that build on it."""
    from experiments.steps import STEPS
    from models import MODELS

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    all_models = re.search(r"^ALL_MODELS := ([^#\n]*)", makefile, re.M).group(1).split()
    order = re.search(r"^STUDY_ORDER \?= ([^#\n]*)", makefile, re.M).group(1).split()
    assert sorted(all_models) == sorted(MODELS) == sorted(order)
    reproduced = re.search(r"^STEPS := ([^#\n]*)", makefile, re.M).group(1).split()
    after = dict(re.findall(r"^AFTER_(\S+) := (\S+)", makefile, re.M))
    declared = {
        name: step.warm_start or step.source
        for name, step in STEPS.items()
        if name in reproduced and (step.warm_start or step.source)
    }
    assert after == declared
    assert all(source in reproduced for source in after.values())
    # make reproduce's jobs: each chain runs its steps in order, so a source comes first
    chains = dict(re.findall(r"^CHAIN_(\S+) := ([^#\n]*)", makefile, re.M))
    names = re.search(r"^CHAINS := ([^#\n]*)", makefile, re.M).group(1).split()
    assert sorted(names) == sorted(chains)  # every chain is run, and only declared ones
    steps_in_chains = [s for chain in chains.values() for s in chain.split()]
    assert sorted(steps_in_chains) == sorted(reproduced)  # every step once
    for chain in chains.values():
        order = chain.split()
        for step, source in declared.items():
            if step in order:
                assert source in order[: order.index(step)], f"{step} before {source}"
    from experiments.steps import RECIPE_MODELS

    recipe = re.search(r"^RECIPE_MODELS := ([^#\n]*)", makefile, re.M).group(1).split()
    assert recipe == [model for model, _ in RECIPE_MODELS]  # make's recipe jobs: the declared


def _fake_reproduce(tmp_path: Path, behaviour: str) -> tuple[Path, list[str]]:
    """A stand-in interpreter that logs "start ARGS" / "end ARGS" into a trace file and runs
    the shell `behaviour` in between; and the `make reproduce` command that uses it."""
    trace = tmp_path / "trace"
    fake = tmp_path / "fakepy"
    fake.write_text(
        f'#!/bin/sh\necho "start $*" >> {trace}\n{behaviour}\necho "end $*" >> {trace}\n'
    )
    fake.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()
    root = Path(__file__).resolve().parents[1]
    return trace, ["make", "-s", "-C", str(root), "reproduce", f"PY={fake}", f"STAMP={stamp}"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_reproduce_runs_each_study_after_its_source_and_keeps_only_models(tmp_path):
    """`make reproduce` with a stand-in interpreter that logs each call: every (step, model)
    study runs once, after the study it builds on has ended, never more than JOBS at once,
    all before the report; MODELS filters the studies."""
    # the sources are slow: a dependant started early would show
    trace, command = _fake_reproduce(
        tmp_path, 'case "$*" in *task1-step1*|*task2-step3*) sleep 0.4;; *) sleep 0.1;; esac'
    )

    def run(*extra: str) -> list[str]:
        trace.unlink(missing_ok=True)
        subprocess.run([*command, "JOBS=3", *extra], check=True, capture_output=True, timeout=120)
        return trace.read_text().splitlines()

    def study(line: str) -> tuple[str, str] | None:
        found = re.search(r"search --step (\S+) --model (\S+)", line)
        return found.groups() if found else None

    lines = run()
    sources = {
        "task1-step2": "task1-step1",
        "task2-step1": "task1-step1",
        "task2-step2": "task2-step3",
    }
    ended: set[tuple[str, str]] = set()
    running: set[tuple[str, str]] = set()
    started: list[tuple[str, str]] = []
    for line in lines:
        key = study(line)
        if key is None:
            if "experiments report" in line:
                assert not running and len(ended) == 20, (
                    "the report started before the studies ended"
                )
            continue
        step, model = key
        if line.startswith("start"):
            if step in sources:
                assert (sources[step], model) in ended, f"{step}/{model} before its source"
            running.add(key)
            started.append(key)
            assert len(running) <= 3, f"more than JOBS=3 studies at once: {running}"
        else:
            running.remove(key)
            ended.add(key)
    assert sorted(started) == sorted(
        {
            (s, m)
            for s in ("task1-step1", "task1-step2", "task2-step1", "task2-step3", "task2-step2")
            for m in ("vgg", "resnet", "efficientnet", "hybrid")
        }
    )
    only = [study(line) for line in run("MODELS=resnet") if line.startswith("start")]
    models = {key[1] for key in only if key}
    assert models == {"resnet"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_a_failed_study_stops_its_chain_and_make_reproduce(tmp_path):
    """A study that fails: its dependants never start, make reproduce fails, no report."""
    trace, command = _fake_reproduce(
        tmp_path, 'case "$*" in *"task1-step1 --model resnet"*) exit 1;; esac'
    )
    done = subprocess.run([*command, "JOBS=2"], capture_output=True, timeout=120)
    assert done.returncode != 0
    lines = trace.read_text().splitlines()
    assert not any("--model resnet" in line and "task1-step2" in line for line in lines)
    assert not any("--model resnet" in line and "task2-step1" in line for line in lines)
    assert not any("experiments report" in line for line in lines)
