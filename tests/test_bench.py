"""The benchmark command runs and states every target (no timing is asserted)."""

from __future__ import annotations

from experiments.bench import run_bench, step_flops


def test_data_bench_writes_report_with_targets(study_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    path = run_bench(tmp_path / "out", sections=["data"])
    text = path.read_text()
    assert "plain np.load loop" in text and "warm load, dataset cache hit" in text
    assert "| cold read <= 4 s" in text and "| warm load <= 0.3 s" in text


def test_flop_count_grows_with_width():
    assert step_flops("vgg", 8) > 0
    assert step_flops("vgg", 16) > step_flops("vgg", 8)
