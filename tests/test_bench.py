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
