"""The operating-points table: a row per (profile, CPU class) measured from the report that
`make reproduce` just wrote, kept in a CSV, and written between markers, never by hand."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from experiments.core import machine
from experiments.reporting import points

STEPS = ("task1-step1", "task2-step2", "task2-step3")
MODELS = ("vgg", "resnet")


def _report(folder, task1=0.5, task2=0.98):
    """A report's two CSVs: cells of three steps for two models and the two champions."""
    rows = []
    for step in STEPS:
        for i, model in enumerate(MODELS):
            acc = (task1 if step.startswith("task1") else task2) + 0.01 * i
            rows.append(
                {
                    "step": step,
                    "model": model,
                    "accuracy": acc,
                    "estimate": acc,
                    "estimate_low": acc - 0.01,
                    "estimate_high": acc + 0.01,
                    "reference": 0.5 if step.startswith("task1") else 0.99,
                    "delta": acc - (0.5 if step.startswith("task1") else 0.99),
                    "black_acc": 0.98 if model == "vgg" and step.startswith("task1") else 0.9,
                    "vs_baseline": "worse"
                    if model == "resnet" and step == "task2-step2"
                    else "better",
                    "searched_minus_baseline": 0.01,
                    "seeds": 3 if step == "task2-step3" else 1,
                    "run_id": f"{step}-{model}",
                    "study_tflop": 1.25,
                }
            )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "comparison.csv", index=False)
    champions = pd.DataFrame(
        [
            {"task": 1, "eval_acc": 0.5, "eval_low": 0.49, "eval_high": 0.51},
            {"task": 2, "eval_acc": 0.9885, "eval_low": 0.9854, "eval_high": 0.9911},
        ]
    )
    champions.to_csv(folder / "champions.csv", index=False)


def test_a_profile_row_is_measured_from_the_report_and_replaced_when_measured_again(tmp_path):
    reports = tmp_path / "reports"
    _report(reports)
    points.record("quick", time.time() - 65, reports, setup_done=time.time() - 45)
    table = pd.read_csv(reports / points.POINTS_CSV)
    (row,) = table.to_dict("records")
    assert row["profile"] == "quick" and row["cpu_class"] == machine.cpu_class()
    assert 64 <= row["wall_s"] <= 80 and 19 <= row["setup_s"] <= 35
    assert row["task1_acc"] == pytest.approx(0.505) and row["task1_cells"] == 2
    assert row["task2_acc"] == pytest.approx(0.985) and row["task2_cells"] == 4
    assert row["task2_low"] == pytest.approx(0.975) and row["seeds"] == 3
    assert row["champion_test2"] == pytest.approx(0.9885)
    assert row["black_met"].startswith("1 of 2")  # vgg's black half only
    assert row["baseline_met"].startswith("5 of 6")  # task2-step2/resnet is worse
    assert row["reference_met"].startswith("2 of 4")  # vgg (0.98) under 0.99 - 0.005
    assert row["tflop"] == pytest.approx(7.5)  # 6 studies of 1.25
    text = (reports / "operating_points.md").read_text()
    assert "| quick" in text and "1 min 0" in text and "0.9885 [0.9854, 0.9911]" in text
    assert "(setup 0 min 2" in text
    assert "resumed run" not in text  # no study in the store before the command started
    _report(reports, task1=0.6)
    points.record("cpu", time.time() - 600, reports)
    points.record("quick", time.time() - 30, reports)  # measured again: replaces its row
    table = pd.read_csv(reports / points.POINTS_CSV)
    assert list(table["profile"]) == ["quick", "cpu"]
    assert table.set_index("profile").loc["quick", "task1_acc"] == pytest.approx(0.605)
    other = "avx2" if machine.cpu_class() == "bf16" else "bf16"
    line = (reports / "operating_points.md").read_text().strip().split("\n\n")[-1]
    assert max(len(part) for part in line.splitlines()) <= 90  # wrapped as prose
    line = " ".join(line.splitlines())
    assert line.startswith("Not measured: ") and line.endswith("gpu on a GPU.")
    assert f"quick on {points.TARGET_CLASSES[other]}" in line
    assert "full on a CPU with native bf16, full on an AVX2-only CPU" in line
    assert f"cpu on {points.TARGET_CLASSES.get(machine.cpu_class(), '-')}" not in line


def test_the_table_goes_between_the_markers_and_nowhere_else(tmp_path):
    reports = tmp_path / "reports"
    _report(reports)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{points.START}\nold table\n{points.END}\nafter\n")
    plain = tmp_path / "other.md"
    plain.write_text("no markers here\n")
    table = points.upsert(points.measure("cpu", 1234, reports), reports / points.POINTS_CSV)
    written = points.write_tables(table, reports, [readme, plain])
    assert readme in written and plain not in written
    text = readme.read_text()
    assert "old table" not in text and "20 min 34 s" in text
    assert text.startswith("intro\n") and text.endswith(f"{points.END}\nafter\n")
    assert plain.read_text() == "no markers here\n"


def test_rows_added_to_the_csv_by_hand_are_shown_by_profile_then_cpu_class(tmp_path):
    reports = tmp_path / "reports"
    _report(reports)
    path = reports / points.POINTS_CSV
    table = points.upsert(points.measure("full", 900, reports), path)
    rows = [table]
    for profile, cpu_class in (("cpu", "bf16"), ("quick", "bf16"), ("cpu", "avx2")):
        row = table.iloc[[0]].assign(profile=profile, cpu_class=cpu_class)
        rows.append(row.assign(cpu=f"{profile}-{cpu_class}-cpu"))
    pd.concat(rows).to_csv(path, index=False)  # a row appended from another clone's CSV
    points.render(reports)
    lines = (reports / "operating_points.md").read_text().splitlines()
    shown = [
        line.split("|")[1].strip() for line in lines if line.startswith("| ") and "-cpu" in line
    ]
    assert shown == ["quick", "cpu", "cpu"]
    cpus = [line for line in lines if "-cpu" in line]
    assert "cpu-avx2-cpu" in cpus[1] and "cpu-bf16-cpu" in cpus[2]
    assert lines.index(cpus[-1]) < next(i for i, line in enumerate(lines) if "| full" in line)


def test_without_a_report_or_with_a_bad_start_nothing_is_written(tmp_path):
    reports = tmp_path / "reports"
    with pytest.raises(FileNotFoundError, match="comparison.csv"):
        points.record("cpu", time.time(), reports)
    _report(reports)
    with pytest.raises(ValueError, match="--started"):
        points.record("cpu", time.time() + 3600, reports)  # in the future
    assert not (reports / points.POINTS_CSV).exists()
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        points.render(reports)


def test_a_run_resumed_on_a_store_with_older_studies_adds_the_earlier_sittings(tmp_path):
    """Sittings before this one, each from its runs' first start to their last logged metric:
    a run that finished; one ended 20 min after its last metric when found dead (that end
    is not its own); one left RUNNING by a process killed with -9; one stopped with Ctrl-C
    5 min after its last metric (its end is its own). Runs from before this profile's first
    study (another profile's) and study parents are not counted."""
    from mlflow.tracking import MlflowClient

    from experiments.tracking import store

    store.init()
    client = MlflowClient()
    minute = 60 * 1000
    now = int(time.time() * 1000)
    experiment = store.experiment_id("task1-step1")

    def run(start, metric, end=None, status="FINISHED", **tags):
        made = client.create_run(experiment, start_time=now - start * minute, tags=tags)
        client.log_metric(made.info.run_id, "val_acc", 0.9, timestamp=now - metric * minute)
        if status != "RUNNING":
            client.set_terminated(made.info.run_id, status, end_time=now - end * minute)

    run(480, 460, 450, **{"budget.profile": "cpu", "role": "study"})  # another profile's
    run(470, 455, 450)
    run(300, 240, 240, **{"budget.profile": "full", "role": "study"})  # a parent: left out
    run(300, 240, 240)  # sitting 1: 60 min
    run(180, 120, 100, "KILLED", interrupted="true")  # sitting 2 ...
    run(150, 118, status="RUNNING")  # ... to here: 62 min
    run(90, 70, 65, "KILLED", interrupted="true")  # sitting 3: 25 min
    reports = tmp_path / "reports"
    _report(reports)
    points.record("full", time.time() - 60, reports)
    row = pd.read_csv(reports / points.POINTS_CSV).set_index("profile").loc["full"]
    assert bool(row["resumed"]) is True
    assert row["sittings"] == 4
    assert row["earlier_s"] == pytest.approx((60 + 62 + 25) * 60, abs=2)
    lines = (reports / "operating_points.md").read_text().splitlines()
    (line,) = [line for line in lines if line.startswith("| full")]
    assert "2 h 28 min in 4 sittings, the last 1 min 00 s" in line


def test_earlier_sittings_are_the_runs_spans_joined_across_short_gaps_and_cut_at_the_start():
    at = pd.Timestamp("2026-01-01T00:00Z")
    minute = pd.Timedelta(minutes=1)
    spans = pd.DataFrame(
        {
            "start": [at + 10 * minute, at, at + 28 * minute, at + 95 * minute],
            "end": [at + 20 * minute, at + 12 * minute, at + 40 * minute, at + 200 * minute],
        }
    )
    blocks = points.earlier_sittings(spans, before=at + 100 * minute)
    assert blocks == [
        (at, at + 40 * minute),
        (at + 95 * minute, at + 100 * minute),
    ]  # 8 min: joined
    assert points.earlier_sittings(spans.iloc[0:0], before=at) == []


def test_a_run_that_continued_from_a_saved_state_marks_its_row_resumed(tmp_path):
    """A store made after the command started, but holding a run that continued from a state
    an earlier process saved (a kept CACHE_DIR): its time is not the whole run's either."""
    import mlflow

    from experiments.tracking import store

    store.init()
    started = time.time() - 0.1
    with mlflow.start_run(experiment_id=store.experiment_id("task1-step1")):
        mlflow.log_param("split.resumed_at_epoch", 3)
    reports = tmp_path / "reports"
    _report(reports)
    points.record("full", started, reports)
    table = pd.read_csv(reports / points.POINTS_CSV)
    assert bool(table.set_index("profile").loc["full", "resumed"]) is True
