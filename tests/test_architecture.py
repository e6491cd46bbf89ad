"""The architecture's promises: a new model is one file, one module queries runs, rooms stay small."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import runs_in

import models
from experiments.cli import main
from experiments.reporting.report import collect

ROOT = Path(__file__).resolve().parents[1]


THROWAWAY = """
from torch import nn

from models.registry import register_model


@register_model("throwaway", cost=10)
class Throwaway(nn.Module):
    \"\"\"A model the project has never seen: one conv, pooling, a linear head.\"\"\"

    TITLE = "Throwaway"
    SEARCH_SPACE = {"width": ("categorical", (4, 6))}

    def __init__(self, num_classes: int = 6, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.body(x)))
"""


@pytest.fixture
def throwaway_file(tmp_path, monkeypatch):
    """models/throwaway.py, as a user would add it: one file in the models package's folder
    (a second folder of the package here, so the checkout is left alone), found by discovery."""
    folder = tmp_path / "more_models"
    folder.mkdir()
    (folder / "throwaway.py").write_text(THROWAWAY)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(folder)])
    monkeypatch.setattr(models, "MODELS", models.MODELS)  # restored below, entry by entry
    before = dict(models.MODELS)
    models._discover()
    yield
    models.MODELS.clear()
    models.MODELS.update(before)
    sys.modules.pop("models.throwaway", None)


def test_a_model_added_as_one_file_trains_searches_and_reports(
    study_data, throwaway_file, tmp_path, capsys
):
    assert "throwaway" in models.MODELS and models.by_cost()[0] == "throwaway"
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


def _planned(text: str) -> list[tuple[str, str]]:
    """The (step, model) studies that `make -n` output plans, in order (a chain per line)."""
    planned = []
    for found in re.finditer(r"search ((?:--step \S+ +)+)--model (\S+)", text):
        planned += [(step, found.group(2)) for step in found.group(1).split()[1::2]]
    return planned


def _project_copy(tmp_path: Path) -> Path:
    """The parts of the checkout that make reads and imports, copied (no data, no venv)."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, copy / name)
    for package in ("models", "experiments", "data_tools"):
        shutil.copytree(
            ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return copy


def _make(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """make in `folder`, its registry read with this interpreter (no venv of its own needed)."""
    stamp = folder / "stamp"
    if not stamp.exists():  # once: a newer stamp would rebuild the registry on every call
        stamp.touch()
    venv = folder / "venv"
    venv.mkdir(exist_ok=True)
    variables = [f"STAMP={stamp}", f"VENV={venv}", f"REGISTRY_PY={sys.executable}"]
    return subprocess.run(
        ["make", "-C", str(folder), *args, *variables], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_reproduce_plans_a_model_added_as_one_file(tmp_path):
    copy = _project_copy(tmp_path)
    (copy / "models" / "throwaway.py").write_text(THROWAWAY)
    plan = _make(copy, "-n", "reproduce", "JOBS=1")
    assert plan.returncode == 0, plan.stderr
    planned = _planned(plan.stdout)
    steps = {step for step, model in planned if model == "throwaway"}
    assert steps == {"task1-step1", "task1-step2", "task2-step1", "task2-step3", "task2-step2"}
    assert planned[0][1] == "throwaway"  # cost=10: the most expensive model's chains start first
    (copy / "models" / "throwaway.py").unlink()
    again = _make(copy, "-n", "reproduce", "JOBS=1")
    assert again.returncode == 0 and "--model throwaway" not in again.stdout


def test_only_the_results_layer_queries_runs():
    query = re.compile(r"search_runs\(|\.get_run\(|search_experiments\(|get_metric_history\(")
    scanned = [
        path
        for folder in ("experiments", "data_tools", "models")
        for path in (ROOT / folder).rglob("*.py")
    ]
    assert any(path.parent.name == "serving" for path in scanned)  # the walk enters subpackages
    offenders = [
        path.relative_to(ROOT).as_posix()
        for path in scanned
        if path.name != "results.py" and query.search(path.read_text())
    ]
    assert offenders == []


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_every_declared_step_is_a_make_target_and_nothing_else_is(tmp_path):
    from experiments.core.steps import STEPS

    copy = _project_copy(tmp_path)
    for step in STEPS:
        dry = _make(copy, "-n", step, "MODELS=vgg")
        assert dry.returncode == 0, dry.stderr
        assert f"--step {step}" in dry.stdout
    unknown = _make(copy, "-n", "task-no-such-step")
    assert unknown.returncode != 0 and "No rule to make target" in unknown.stderr


def test_make_reproduce_covers_every_registered_model_and_its_sources(tmp_path):
    """ALL_MODELS is the registry, STUDY_ORDER names each model once, and the steps make reads
    (generated from experiments/core/steps.py, never copied by hand into the Makefile) hold
    AFTER_<step> (which study a job waits for: the warm-start source, or the study a reuse
    step reads); each CHAIN_ (one job of make reproduce) runs a source before the steps that
    build on it; the recipe jobs are the declared recipes."""
    from experiments.core.steps import RECIPE_MODELS, STEPS, make_variables
    from models import MODELS

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert not re.search(r"^(STEPS|CHAIN_\S+|AFTER_\S+|RECIPE_MODELS) :?= \w", makefile, re.M)
    plan = _make(_project_copy(tmp_path), "-n", "studies", "JOBS=1")
    assert plan.returncode == 0, plan.stderr
    planned = [model for _, model in _planned(plan.stdout)]
    assert list(dict.fromkeys(planned)) == models.by_cost() and set(planned) == set(MODELS)
    variables = make_variables()
    reproduced = variables["STEPS"].split()
    after = {k[len("AFTER_") :]: v for k, v in variables.items() if k.startswith("AFTER_")}
    declared = {
        name: step.warm_start or step.source
        for name, step in STEPS.items()
        if name in reproduced and (step.warm_start or step.source)
    }
    assert after == declared
    assert all(source in reproduced for source in after.values())
    chains = {k[len("CHAIN_") :]: v for k, v in variables.items() if k.startswith("CHAIN_")}
    assert sorted(variables["CHAINS"].split()) == sorted(chains)
    steps_in_chains = [s for chain in chains.values() for s in chain.split()]
    assert sorted(steps_in_chains) == sorted(reproduced)  # every step once
    for chain in chains.values():
        order = chain.split()
        for step, source in declared.items():
            if step in order:
                assert source in order[: order.index(step)], f"{step} before {source}"
    recipe = variables["MODELS_task2-recipe"].split()
    assert recipe == [model for model, _ in RECIPE_MODELS]
    (tmp_path / "again").mkdir()
    dry = _make(_project_copy(tmp_path / "again"), "-n", "task2-recipe")
    assert dry.returncode == 0, dry.stderr
    line = next(line for line in dry.stdout.splitlines() if "--step task2-recipe" in line)
    assert line.split("--step task2-recipe", 1)[1].split() == [
        word for model in recipe for word in ("--model", model)
    ]


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

    def studies(line: str) -> list[tuple[str, str]]:
        """The (step, model) studies of one process, in the order it runs them."""
        found = re.search(r"search ((?:--step \S+ +)+)--model (\S+)", line)
        if not found:
            return []
        return [(step, found.group(2)) for step in found.group(1).split()[1::2]]

    lines = run()
    sources = {
        "task1-step2": "task1-step1",
        "task2-step1": "task1-step1",
        "task2-step2": "task2-step3",
    }
    ended: set[tuple[str, str]] = set()
    running: set[tuple[str, ...]] = set()
    started: list[tuple[str, str]] = []
    for line in lines:
        chain = studies(line)
        if not chain:
            if "experiments report" in line:
                assert not running and len(ended) == 20, (
                    "the report started before the studies ended"
                )
            continue
        key = tuple(step for step, _ in chain) + (chain[0][1],)
        if line.startswith("start"):
            for index, (step, model) in enumerate(chain):
                earlier = chain[:index]  # run before it by the same process
                if step in sources:
                    source = (sources[step], model)
                    assert source in ended or source in earlier, f"{step}/{model} before its source"
            running.add(key)
            started += chain
            assert len(running) <= 3, f"more than JOBS=3 processes at once: {running}"
        else:
            running.remove(key)
            ended.update(chain)
    assert sorted(started) == sorted(
        {
            (s, m)
            for s in ("task1-step1", "task1-step2", "task2-step1", "task2-step3", "task2-step2")
            for m in ("vgg", "resnet", "efficientnet", "hybrid")
        }
    )
    only = [s for line in run("MODELS=resnet") if line.startswith("start") for s in studies(line)]
    models = {model for _, model in only}
    assert models == {"resnet"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_a_failed_study_stops_its_chain_and_make_reproduce(tmp_path):
    """A chain whose study fails: make reproduce fails and writes no report (inside the chain's
    process the later studies never start: test_search's chain test)."""
    trace, command = _fake_reproduce(
        tmp_path, 'case "$*" in *"--step task1-step1 "*"--model resnet"*) exit 1;; esac'
    )
    done = subprocess.run([*command, "JOBS=2"], capture_output=True, timeout=120)
    assert done.returncode != 0
    lines = trace.read_text().splitlines()
    failed = [line for line in lines if "--step task1-step1 " in line and "--model resnet" in line]
    assert failed and not any(line.startswith("end") for line in failed)
    assert not any("experiments report" in line for line in lines)
