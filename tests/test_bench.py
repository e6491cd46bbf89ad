"""The benchmark command runs and states every target (no timing is asserted)."""

from __future__ import annotations

import pytest

from experiments.bench import run_bench, step_flops


def test_data_bench_writes_report_with_targets(study_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    path = run_bench(tmp_path / "out", sections=["data"])
    text = path.read_text()
    assert "plain np.load loop" in text and "warm load, dataset cache hit" in text
    assert "| cold read <= 4 s" in text and "| warm load <= 0.3 s" in text


def test_flop_count_grows_with_width_and_is_linear_in_batch():
    narrow, wide = step_flops("vgg", 8, width=8), step_flops("vgg", 8, width=16)
    # conv FLOPs scale with in x out channels: doubling the width roughly quadruples them
    assert 3.0 * narrow < wide < 4.5 * narrow
    assert step_flops("vgg", 16, width=8) == pytest.approx(2 * narrow)


def test_fidelity_bench_ranks_every_fidelity_against_the_final(study_data, tmp_path, monkeypatch):
    import experiments.bench as bench

    monkeypatch.setattr(bench, "FIDELITY_STUDIES", (("task2-step3", "hybrid"),))
    frame = bench.bench_fidelity(configs=2)
    names = set(frame["fidelity"])
    assert set(bench.FIDELITIES) < names and "final budget (reference)" in names
    assert (frame["settings"] == 3).all()  # the defaults and two drawn settings
    rho = frame.set_index("fidelity")["Spearman rho vs final"]
    assert rho["final budget (reference)"] == 1.0


def test_precision_bench_lists_every_model_and_the_auto_choice(study_data, tmp_path, monkeypatch):
    from experiments import inference
    from models import MODELS

    monkeypatch.setenv("BENCH_IMAGES", "64")
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: True)
    text = run_bench(tmp_path / "out", sections=["precision"]).read_text()
    section = text.partition("## Training precision")[2].partition("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert {row.split("|")[1].strip() for row in rows} == set(MODELS)
    auto = {row.split("|")[1].strip(): row.split("|")[5].strip() for row in rows}
    assert auto["efficientnet"] == "fp32" and auto["vgg"] == "bf16"


def test_lever_bench_chooses_on_select2_and_reports_test2_after(study_data, tmp_path, monkeypatch):
    import experiments.bench as bench

    monkeypatch.setattr(bench, "LEVER_MODELS", {"hybrid": {"width": 8}})
    monkeypatch.setattr(bench, "LEVER_RECIPE", {**bench.LEVER_RECIPE, "epochs": 2, "patience": 2})
    monkeypatch.setattr(bench, "LEVERS", {k: bench.LEVERS[k] for k in list(bench.LEVERS)[:2]})
    monkeypatch.setenv("LEVER_SEEDS", "1")
    text = bench.write_levers(tmp_path / "out").read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| hybrid")]
    assert [r[2].strip() for r in rows] == list(bench.LEVERS)[:2]
    select2 = {r[2].strip(): float(r[3]) for r in rows}
    chosen = max(select2, key=select2.get)
    assert f"hybrid: {chosen}" in text.partition("Chosen on SELECT2")[2]
