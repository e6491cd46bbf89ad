"""Trial fidelity: does a trial's validation score rank settings as their finals would?

`python -m experiments fidelity` (`make fidelity`, slow): for each of `FIDELITY_STUDIES`, the
defaults and random settings of the search space, each trained at every trial fidelity and
at the final budget, validated on the same split (no evaluation set is read). Spearman's rho
ranks each fidelity against the final budget. Written to reports/fidelity.md (and its
section of bench.md) and logged as a run of the `fidelity` MLflow experiment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from experiments.core import config
from experiments.core.machine import describe_machine
from experiments.tracking import store

FIDELITY_STUDIES = (("task2-step3", "resnet"), ("task1-step1", "hybrid"))


FIDELITIES = {
    # name: Budget changes; "final" is the reference every other fidelity is ranked against
    "default (4,000-image subset, 6,000 images)": {},
    "2x images (12,000) on the same subset": {"trial_images": 12_000},
    "4x images (24,000) on the same subset": {"trial_images": 24_000},
    "3x larger subset (12,000 images, 24,000 seen)": {
        "train_subset": 12_000,
        "trial_images": 24_000,
    },
}


def bench_fidelity(configs: int = 6, seed: int = 0):
    """Rank correlation between each trial fidelity's validation accuracy and the same settings'
    validation accuracy at the final budget, with the wall seconds each fidelity costs.

    For each study: the defaults plus `configs` settings drawn at random from the search space;
    each trained at every fidelity of `FIDELITIES` and at the final budget (no MLflow).
    """
    import optuna
    import pandas as pd
    from scipy.stats import spearmanr

    from experiments.core.settings import resolve
    from experiments.core.steps import get_step
    from experiments.search.space import Budget, suggest
    from experiments.training.runner import load_step_data
    from experiments.training.train import fit

    rows = []
    for step_name, model in FIDELITY_STUDIES:
        data = load_step_data(get_step(step_name))
        sampler = optuna.samplers.RandomSampler(seed=seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        candidates = [{}]
        for _ in range(configs):
            candidates.append(suggest(study.ask(), model))
        scores: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        for number, params in enumerate(candidates):
            plans = {
                name: Budget(**changes).trial_role(params, data.train_images, number)
                for name, changes in FIDELITIES.items()
            }
            plans["final budget (reference)"] = Budget().final_role(params, data.train_images)
            for name, role in plans.items():
                cfg = resolve(model, searched=params, role=role)
                start = time.perf_counter()
                result = fit(
                    cfg,
                    data.train_set,
                    label=f"fidelity {step_name}/{model} {number}",
                    val_set=data.val_set,
                )
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                scores.setdefault(name, []).append(result.best_val_acc)
        reference = scores["final budget (reference)"]
        for name in scores:
            rho = spearmanr(scores[name], reference).statistic if name in FIDELITIES else 1.0
            rows.append(
                {
                    "study": f"{step_name}/{model}",
                    "fidelity": name,
                    "settings": len(candidates),
                    "wall seconds": seconds[name],
                    "Spearman rho vs final": rho,
                    "rho per minute": rho / (seconds[name] / 60) if name in FIDELITIES else None,
                }
            )
    return pd.DataFrame(rows)


def write_fidelity(out: str | None = None) -> Path:
    """reports/fidelity.md from `bench_fidelity`, and the same section in bench.md.

    `FIDELITY_CONFIGS` (default 6) sets how many random settings join the defaults.
    """
    configs = int(os.environ.get("FIDELITY_CONFIGS", "6"))
    frame = bench_fidelity(configs)
    text = "\n".join(
        [
            "## Trial fidelity: does a trial's score predict its final?",
            "",
            f"Machine: {describe_machine()}. For each study, the defaults and {configs} random settings of the",
            "search space, each trained at every trial fidelity and at the final budget (validation",
            "accuracy on the same split; no evaluation set is read). Spearman rho ranks each",
            "fidelity's scores against the final budget's.",
            "",
            frame.to_markdown(index=False, floatfmt=".3f", missingval=""),
            "",
        ]
    )
    folder = config.reports_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fidelity.md").write_text(text)
    bench = folder / "bench.md"
    old = bench.read_text() if bench.exists() else "# Benchmarks\n"
    head, marker, rest = old.partition("## Trial fidelity")
    tail = rest[rest.find("\n## ") :] if marker and "\n## " in rest else ""
    bench.write_text(head.rstrip("\n") + "\n\n" + text + tail.lstrip("\n"))
    print(text)
    params = {"configs": configs, "studies": FIDELITY_STUDIES, "machine": describe_machine()}
    run_id = store.log_measurement("fidelity", params, frame, [folder / "fidelity.md"])
    print(f"logged to MLflow run {run_id} (experiment fidelity)")
    return folder / "fidelity.md"
