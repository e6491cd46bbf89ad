"""The benchmark command runs and states every target (no timing is asserted); the fidelity
and levers experiments run and are tracked."""

from __future__ import annotations

import pytest
import torch
from conftest import runs_in

import experiments.bench.kernels as kernels
import experiments.bench.run as bench
import experiments.bench.timing as timing
import experiments.bench.training as training
from experiments.bench.kernels import compile_break_even
from experiments.bench.overhead import REPRODUCE_SECTION
from experiments.bench.run import run_bench
from experiments.bench.timing import conv_peak, step_flops
from experiments.core.reports import markdown_sections


def test_data_bench_writes_report_with_targets(study_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    path = run_bench(tmp_path / "out", sections=["data"])
    text = path.read_text()
    assert "plain np.load loop" in text and "warm load, dataset cache hit" in text
    assert "| cold read <= 4 s" in text and "| warm load <= 0.3 s" in text
    assert "Measured on " in text.partition("## Data loading")[2].partition("\n## ")[0]


def test_a_default_run_keeps_only_what_other_commands_measure(study_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    monkeypatch.setattr(bench, "DEFAULT_SECTIONS", ("data",))  # a default run, made small
    out = tmp_path / "out"
    head, parts = markdown_sections(run_bench(out).read_text())
    assert "Not timed here" in parts[REPRODUCE_SECTION]
    parts[REPRODUCE_SECTION] = f"{REPRODUCE_SECTION}\n\nWall time: 28.3 min.\n\n"
    targets = parts.pop("## Targets").rstrip("\n") + "\n"
    parts[kernels.COMPILE_SECTION] = f"{kernels.COMPILE_SECTION}\n\nMeasured on another CPU.\n\n"
    parts["## An old section"] = "## An old section\n\nstale\n\n"  # no run writes it any more
    targets += f"| {kernels.COMPILE_TARGET} | not kept | met |\n| an old target | 1 | GAP |\n"
    (out / "bench.md").write_text(head + "".join(parts.values()) + targets)
    again = run_bench(out).read_text()
    assert "Measured on another CPU." in again and "Wall time: 28.3 min." in again
    assert "Not timed here" not in again and "stale" not in again and "an old target" not in again
    assert again.count(f"| {kernels.COMPILE_TARGET} |") == 1 and again.count("## Data loading") == 1
    # the kept sections sit before "What was tried", in the run's own order
    assert again.index(kernels.COMPILE_SECTION) < again.index(bench.HISTORY_SECTION)


def test_bench_points_at_the_gpu_measurements(study_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    out = tmp_path / "out"
    assert "No GPU measurement yet" in run_bench(out, sections=["data"]).read_text()
    (out / "gpu.md").write_text("# GPU measurements\n\n## a run\n\nmeasured on an H200\n")
    text = run_bench(out, sections=["data"]).read_text()  # replaces the section of the last run
    assert "reports/gpu.md" in text and "No GPU measurement yet" not in text
    assert text.count("## GPU") == 1


def test_flop_count_grows_with_width_and_is_linear_in_batch():
    narrow, wide = step_flops("vgg", 8, width=8), step_flops("vgg", 8, width=16)
    # conv FLOPs scale with in x out channels: doubling the width roughly quadruples them
    assert 3.0 * narrow < wide < 4.5 * narrow
    assert step_flops("vgg", 16, width=8) == pytest.approx(2 * narrow)


def test_utilisation_is_measured_against_the_best_dense_kernel(study_data, monkeypatch):
    from models import MODELS

    monkeypatch.setattr(training, "reference_throughput", lambda name, files, images: 100.0)
    monkeypatch.setattr(training, "project_throughput", lambda name, ts, images, prec: (200.0, 8))
    monkeypatch.setattr(timing, "matmul_peak", lambda dtype: 1e9 if dtype == "fp32" else 2e9)
    monkeypatch.setattr(timing, "conv_peak", lambda dtype: 4e9 if dtype == "fp32" else 8e9)
    from experiments.training import inference

    for bf16, dtypes in ((False, {"fp32"}), (True, {"fp32", "bf16"})):
        monkeypatch.setattr(inference, "cpu_has_bf16", lambda bf16=bf16: bf16)
        rows, peaks, results = training.bench_training(study_data, 16)
        assert {key.split()[0] for key in peaks} == dtypes and len(rows) == len(MODELS)
        for name, (speedup, mfu) in results.items():
            # each model against the best kernel (the convolution here) in its own precision
            precision = inference.training_precision("auto", torch.device("cpu"), name)
            assert precision == ("bf16" if bf16 and name != "efficientnet" else "fp32")
            peak = 8e9 if precision == "bf16" else 4e9
            assert speedup == 2.0
            assert mfu == pytest.approx(step_flops(name, 8) / 8 * 200.0 / peak)
    assert 0 < conv_peak(channels=8, side=6, batch=4, repeats=1) < float("inf")  # the real one
    assert 0 < conv_peak(channels=8, side=6, batch=4, repeats=1, dtype="bf16") < float("inf")


def test_conv_peak_counts_two_flops_per_multiply_add(monkeypatch):
    monkeypatch.setattr(timing, "timed", lambda fn, repeats=1: 2.0)  # 2 s for 4 convolutions
    flops = 2 * 4 * 6 * 6 * 8 * 8 * 9  # batch 4, 6x6, 8 -> 8 channels, 3x3
    assert conv_peak(channels=8, side=6, batch=4, repeats=4) == pytest.approx(flops / 0.5)


@pytest.mark.slow  # a benchmark command end to end: make test-all
def test_fidelity_ranks_every_fidelity_against_the_final(study_data, tmp_path, monkeypatch):
    import experiments.search.fidelity as fidelity

    monkeypatch.setattr(fidelity, "FIDELITY_STUDIES", (("task2-step3", "hybrid"),))
    frame = fidelity.bench_fidelity(configs=2)
    names = set(frame["fidelity"])
    assert set(fidelity.FIDELITIES) < names and "final budget (reference)" in names
    assert (frame["settings"] == 3).all()  # the defaults and two drawn settings
    rho = frame.set_index("fidelity")["Spearman rho vs final"]
    assert rho["final budget (reference)"] == 1.0
    monkeypatch.setenv("FIDELITY_CONFIGS", "1")
    written = fidelity.write_fidelity(tmp_path / "out")
    assert "Spearman rho" in written.read_text()
    assert "## Trial fidelity" in (tmp_path / "out" / "bench.md").read_text()
    (tracked,) = runs_in("fidelity")
    assert tracked.data.params["configs"] == "1"


@pytest.mark.slow  # a benchmark command end to end: make test-all
def test_precision_bench_lists_every_model_and_the_auto_choice(study_data, tmp_path, monkeypatch):
    from experiments.training import inference
    from models import MODELS

    monkeypatch.setenv("BENCH_IMAGES", "64")
    monkeypatch.setenv("BENCH_DROP_CACHES", "0")
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: True)
    run_bench(tmp_path / "out", sections=["data"])
    text = run_bench(tmp_path / "out", sections=["precision"]).read_text()
    # a partial run keeps the other sections and their targets
    assert "## Data loading" in text and "| warm load <= 0.3 s |" in text
    assert text.count("## Targets") == 1 and text.index("## Targets") > text.index("## Training")
    section = text.partition("## Training precision")[2].partition("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert {row.split("|")[1].strip() for row in rows} == set(MODELS)
    auto = {row.split("|")[1].strip(): row.split("|")[5].strip() for row in rows}
    assert auto["efficientnet"] == "fp32" and auto["vgg"] == "bf16"


def test_levers_run_every_lever_write_the_rule_and_are_tracked(study_data, tmp_path, monkeypatch):
    import experiments.analysis.levers as lever_study

    monkeypatch.setattr(lever_study, "LEVER_MODELS", {"hybrid": {"width": 8}})
    monkeypatch.setattr(
        lever_study, "LEVER_RECIPE", {**lever_study.LEVER_RECIPE, "epochs": 2, "patience": 2}
    )
    first, second = (list(levers.items())[:2] for _, levers in lever_study.LEVER_ROUNDS.values())
    rounds = {"1": ("first", dict(first)), "2": ("second", dict(second))}
    monkeypatch.setattr(lever_study, "LEVER_ROUNDS", rounds)
    monkeypatch.setenv("LEVER_SEEDS", "1")
    out = tmp_path / "out"
    text = lever_study.write_levers(out).read_text()  # the newest round by default
    assert "## Round 2: second" in text and "## Round 1" not in text
    monkeypatch.setenv("LEVER_ROUND", "1")
    lever_study.write_levers(out)
    monkeypatch.setenv("LEVER_ROUND", "2")
    text = lever_study.write_levers(out).read_text()  # a rerun replaces its own section only
    assert text.count("## Round 2: second") == 1 and text.count("## Round 1: first") == 1
    assert text.index("## Round 1") < text.index("## Round 2")
    section = text.partition("## Round 2: second")[2]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| hybrid")]
    assert [r[2].strip() for r in rows] == [name for name, _ in second]
    assert all(0.0 <= float(r[3]) <= 1.0 and 0.0 <= float(r[4]) <= 1.0 for r in rows)
    assert "Kept: hybrid: " in section
    # one member per lever here (one model, one seed): the ensemble row is that run
    ensembles = [
        r.split("|") for r in section.splitlines() if r.startswith(f"| {lever_study.ENSEMBLE_ROW}")
    ]
    assert [r[2].strip() for r in ensembles] == [name for name, _ in second]
    for single, ensemble in zip(rows, ensembles, strict=True):
        assert float(ensemble[3]) == pytest.approx(float(single[3]), abs=1e-4)  # SELECT2
        assert float(ensemble[4]) == pytest.approx(float(single[4]), abs=1e-4)  # TEST2
    tracked = runs_in("levers")
    assert len(tracked) == 3 and {r.data.params["round"] for r in tracked} == {"1", "2"}
    monkeypatch.setenv("LEVER_ROUND", "9")
    with pytest.raises(ValueError, match="LEVER_ROUND=9"):
        lever_study.write_levers(out)


def test_levers_are_kept_on_select2_only_and_by_a_margin():
    import pandas as pd

    import experiments.analysis.levers as lever_study

    recipe, a, b = list(lever_study.LEVERS)[:3]

    def frame(select2: dict, test2: dict) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"model": "m", "lever": k, "SELECT2 (mean)": select2[k],
                 "TEST2 (mean, measured after)": test2[k]}
                for k in (recipe, a, b)
            ]
        )  # fmt: skip

    # SELECT2 prefers a by 3 images of 600, TEST2 prefers b: a is kept
    chosen = frame({recipe: 0.990, a: 0.995, b: 0.991}, {recipe: 0.98, a: 0.97, b: 0.99})
    assert lever_study.kept_levers(chosen, 600) == {"m": a}
    # one image better is below the margin: the recipe alone
    close = frame({recipe: 0.990, a: 0.990 + 1 / 600, b: 0.990}, {recipe: 0.9, a: 0.9, b: 0.99})
    assert lever_study.kept_levers(close, 600) == {"m": None}


def test_compile_pays_only_when_it_is_faster_per_image():
    import math

    # 100 vs 200 images/s saves 5 ms an image: a 10 s compile pays after 2,000 images
    assert compile_break_even(100.0, 200.0, 10.0) == pytest.approx(2_000)
    assert math.isinf(compile_break_even(200.0, 190.0, 10.0))  # slower compiled: never
    assert math.isinf(compile_break_even(200.0, 200.0, 0.0))


def test_predict_bench_compares_the_batches_per_model_and_thread(study_data, tmp_path):
    import torch

    from experiments.bench.kernels import PREDICT_TARGET
    from experiments.training.inference import PREDICT_BATCH
    from models import MODELS

    threads = torch.get_num_threads()
    text = run_bench(tmp_path / "out", sections=["predict"]).read_text()
    assert torch.get_num_threads() == threads  # the one-thread rows gave the threads back
    section = text.partition("## Prediction batch")[2].partition("\n## ")[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    body = [row for row in rows[1:] if "---" not in row[1]]
    assert {row[1].strip() for row in body} == set(MODELS)
    assert len(body) == len(MODELS) * len({1, threads})  # one row per model and thread count
    assert f"batch {PREDICT_BATCH} img/s" in rows[0][4]
    assert all(row[6].strip() in ("yes", "no") and row[5].strip().endswith("x") for row in body)
    assert f"| {PREDICT_TARGET} |" in text


def test_depthwise_bench_compares_both_gradients_per_config_and_thread(
    study_data, tmp_path, monkeypatch
):
    import torch

    from models import layers

    monkeypatch.setenv("BENCH_IMAGES", "64")
    monkeypatch.setattr(kernels, "DEPTHWISE_CONFIGS", ({},))  # the default model only: fast
    threads = torch.get_num_threads()
    calls = []
    original = layers._SmallMapDepthwise.apply
    monkeypatch.setattr(
        layers._SmallMapDepthwise, "apply", lambda *a: calls.append(1) or original(*a)
    )
    rows, _ = kernels.bench_depthwise(study_data, 64, repeats=1)
    assert calls  # the timed fast runs really took the batched-matmul gradient
    assert len(rows) == len({1, threads}) and all(row.endswith("x |") for row in rows)
    text = run_bench(tmp_path / "out", sections=["depthwise"]).read_text()
    assert torch.get_num_threads() == threads and layers._small_map_path  # both given back
    section = text.partition(kernels.DEPTHWISE_SECTION)[2].partition("\n## ")[0]
    tables = [block for block in section.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 2  # whole-model rows, then one row per small-map layer shape
    layer_rows = tables[1].splitlines()[2:]
    assert layer_rows and {row.split("|")[1].strip() for row in layer_rows} <= {"3x3", "5x5"}
    assert all(row.split("|")[3].strip() == "4x4" for row in layer_rows)
    used = {row.split("|")[1].strip(): row.split("|")[9].strip() for row in layer_rows}
    assert used == {"3x3": "no", "5x5": "yes"}  # the default model has both on 4x4 maps
    assert "Largest relative difference" in section and f"| {kernels.DEPTHWISE_TARGET} |" in text


def test_gpu_bench_script_runs_in_tiny_cpu_mode_and_appends(study_data, tmp_path, capsys):
    """`make gpu-bench`'s script, as it runs on a lent GPU, in its tiny CPU mode."""
    from experiments.cli import main
    from models import MODELS

    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu.md").write_text("# GPU measurements\n\n## an earlier run\n\nkept\n")
    assert main(["gpu-bench", "--tiny", "--out", str(out)]) == 0
    text = (out / "gpu.md").read_text()
    assert "## an earlier run\n\nkept" in text and text.count("(tiny mode)") == 1  # appended
    section = text.rpartition("## ")[2]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    assert {(r[1].strip(), r[2].strip()) for r in rows} == {
        (m, b) for m in MODELS for b in ("8", "16")
    }
    assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows)  # eager and graphed images/s
    # on a CPU the static step runs eagerly: the same weights as the eager loop, exactly
    assert all(float(r[9]) == 0 for r in rows)
    assert "`make -n reproduce PROFILE=gpu` (JOBS=" in section and ": dry run" in section


def test_study_flops_from_store_count_what_the_runs_trained(study_data):
    """The A/B count, read back from params and metrics, equals the training and validation
    FLOPs each run logged when it trained (scoring excluded)."""
    from experiments.bench.study import study_flops_from_store
    from experiments.cli import main
    from experiments.tracking import store

    args = ["--trials", "2", "--epochs", "1", "--final-epochs", "1"]
    assert main(["search", "--step", "task2-step3", "--model", "vgg", *args]) == 0
    trained = [r for r in runs_in("task2-step3") if "epochs_run" in r.data.metrics]
    assert len(trained) >= 3  # trials and the final
    expected = sum(
        r.data.metrics["train_flops"]
        + r.data.metrics["flops_per_image"]
        * int(r.data.params["split.val_images"])
        * r.data.metrics["epochs_run"]
        for r in trained
    )
    flops, counted = study_flops_from_store(store.init())
    assert counted == len(trained)
    assert flops == pytest.approx(expected, rel=1e-9)


def test_study_section_divides_flops_by_wall_time_and_the_peak(monkeypatch):
    import experiments.bench.study as study

    monkeypatch.setattr(timing, "dense_peaks", lambda dtype: {"k1": 1e11, "k2": 2e11})
    results = {
        "A: old": {"seconds": 100.0, "flops": 2e12, "runs": 5},  # 10 % of 2e11
        "B: this tree": {"seconds": 50.0, "flops": 3e12, "runs": 6},  # 30 %
    }
    monkeypatch.setattr(study, "bench_study", lambda baseline, extra: results)
    lines, [(name, measured, met)] = study.study_section("Measured on a test CPU.")
    text = "\n".join(lines)
    assert "| A: old | 100 | 5 | 2.00 | 20.0 | 10.0% |" in text
    assert "| B: this tree | 50 | 6 | 3.00 | 60.0 | 30.0% |" in text
    assert measured.startswith("3.00x") and met  # 30 % / 10 %
    results["B: this tree"]["seconds"] = 100.0  # 15 %: 1.5x, under the 2x target
    assert not study.study_section("Measured on a test CPU.")[1][0][2]


def test_study_baseline_that_git_cannot_check_out_is_one_line(tmp_path):
    from experiments.bench.study import checkout

    with pytest.raises(SystemExit, match="cannot check out baseline 'no-such-ref'"):  # noqa: SIM117
        with checkout("no-such-ref", tmp_path / "wt"):
            pass
