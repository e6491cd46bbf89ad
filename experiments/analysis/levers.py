"""Task 2 levers: each added to one hand-set recipe, judged on SELECT2 (TEST2 measured after).

`python -m experiments levers` (`make levers LEVER_ROUND=N`, slow): one round of
`LEVER_ROUNDS`, `LEVER_SEEDS` seeds each, trained on task2-step3's data; a lever is kept by a
rule fixed before scoring (`kept_levers`), read from SELECT2 only. Written to its section of
reports/levers.md and logged as a run of the `levers` MLflow experiment.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from experiments.core import config
from experiments.core.machine import describe_machine
from experiments.core.reports import markdown_sections
from experiments.core.steps import RECIPE, RECIPE_MODELS
from experiments.tracking import store

# Task 2 levers: one hand-set recipe, each lever added to it, trained on
# task2-step3's data (TEST's white half minus SELECT2), judged on SELECT2; TEST2 measured after.
LEVER_STEP = "task2-step3"


LEVER_RECIPE = dict(RECIPE)  # the task2-recipe step's settings (experiments/core/steps.py)


LEVER_MODELS = {model: dict(knobs) for model, knobs in RECIPE_MODELS}


RECIPE_ROW = "recipe (affine)"


# the rounds of levers, each measured against the recipe in one run (`LEVER_ROUND`)
LEVER_ROUNDS: dict[str, tuple[str, dict[str, dict]]] = {
    "1": (
        "EMA and elastic augmentation",
        {
            RECIPE_ROW: {},
            "+ EMA 0.99": {"ema_decay": 0.99},
            "affine + elastic": {"augmentation": "affine_elastic"},
            "affine + elastic + EMA 0.99": {"augmentation": "affine_elastic", "ema_decay": 0.99},
        },
    ),
    "2": (
        "mixup, cutmix, SWA, wider models",
        {
            RECIPE_ROW: {},
            "+ mixup 0.2": {"mixup_alpha": 0.2},
            "+ cutmix 1.0": {"cutmix_alpha": 1.0},
            "+ SWA from 75 %": {"swa_start": 0.75},
            "width 32": {"width": 32},
        },
    ),
}


LEVERS = {name: changes for _, levers in LEVER_ROUNDS.values() for name, changes in levers.items()}


def bench_levers(seeds: int = 2, levers: dict[str, dict] | None = None):
    """Per (model, lever) of `levers` (default: every round's): SELECT2 accuracy (the selection split, read to choose) and TEST2
    accuracy (measured only), each the mean over `seeds` seeds; then per lever the softmax
    average of all its runs (every model and seed) on both sets; no MLflow."""
    import pandas as pd
    import torch

    from experiments.core.settings import resolve
    from experiments.core.steps import get_step
    from experiments.training.inference import ensemble_accuracy, probabilities
    from experiments.training.runner import load_step_data
    from experiments.training.train import fit

    levers = LEVERS if levers is None else levers
    data = load_step_data(get_step(LEVER_STEP))
    test2 = data.eval_sets["TEST2"]
    rows = []
    members: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {lever: [] for lever in levers}
    for model, knobs in LEVER_MODELS.items():
        for lever, changes in levers.items():
            select2, measured, seconds = [], [], 0.0
            for seed in range(seeds):
                cfg = resolve(model, searched={**LEVER_RECIPE, **knobs, **changes, "seed": seed})
                start = time.perf_counter()
                result = fit(
                    cfg, data.train_set, label=f"lever {model} {lever} {seed}", val_set=data.val_set
                )
                seconds += time.perf_counter() - start
                select2.append(result.best_val_acc)
                on_test2 = probabilities(result, test2.images)  # predicted once: run, ensemble
                measured.append(ensemble_accuracy([on_test2], test2.labels))
                members[lever].append((probabilities(result, data.val_set.images), on_test2))
            rows.append(
                {
                    "model": model,
                    "lever": lever,
                    "SELECT2 (mean)": sum(select2) / seeds,
                    "TEST2 (mean, measured after)": sum(measured) / seeds,
                    "SELECT2 per seed": " / ".join(f"{v:.4f}" for v in select2),
                    "TEST2 per seed": " / ".join(f"{v:.4f}" for v in measured),
                    "wall seconds": seconds,
                }
            )
            print(
                f"  {model} {lever}: SELECT2 {rows[-1]['SELECT2 (mean)']:.4f} "
                f"TEST2 {rows[-1]['TEST2 (mean, measured after)']:.4f}",
                flush=True,
            )
    rows += _ensemble_rows(members, data.val_set.labels, test2.labels)
    frame = pd.DataFrame(rows)
    frame.attrs["select2_images"] = len(data.val_set)
    return frame


def _ensemble_rows(members: dict, select2_labels, test2_labels) -> list[dict]:
    """Per lever, the fixed ensemble recipe: the softmax average of all its runs."""
    from experiments.training.inference import ensemble_accuracy

    rows = []
    for lever, runs in members.items():  # the fixed ensemble recipe: all of a lever's runs
        select2 = ensemble_accuracy([p for p, _ in runs], select2_labels)
        measured = ensemble_accuracy([p for _, p in runs], test2_labels)
        rows.append(
            {
                "model": ENSEMBLE_ROW,
                "lever": lever,
                "SELECT2 (mean)": select2,
                "TEST2 (mean, measured after)": measured,
                "SELECT2 per seed": f"{len(runs)} members",
                "TEST2 per seed": "",
                "wall seconds": 0.0,
            }
        )
    return rows


# a lever is kept when its SELECT2 mean beats the recipe's by at least this many images
LEVER_MARGIN_IMAGES = 2


ENSEMBLE_ROW = "ensemble (every model and seed)"


def kept_levers(frame, select2_images: int) -> dict[str, str | None]:
    """Per model, the lever the rule keeps (None: the recipe alone), read from SELECT2 only:
    the best SELECT2 mean, if it beats the recipe's by at least `LEVER_MARGIN_IMAGES` images
    (fixed before scoring; one image of 600 is 0.0017, below what SELECT2 can tell apart)."""
    recipe = RECIPE_ROW
    kept: dict[str, str | None] = {}
    for model, rows in frame.groupby("model", sort=False):
        scores = rows.set_index("lever")["SELECT2 (mean)"]
        best = scores.drop(recipe).idxmax()
        margin = (scores[best] - scores[recipe]) * select2_images
        kept[model] = best if margin >= LEVER_MARGIN_IMAGES - 1e-6 else None
    return kept


def _levers_head(select2: int) -> str:
    """levers.md's head: what the file is, the data, the rule fixed before scoring."""
    return "\n".join(
        [
            "# Task 2 levers: each added to one hand-set recipe, judged on SELECT2",
            "",
            "Written by `python -m experiments levers` (`make levers LEVER_ROUND=N`).",
            f"Data: {LEVER_STEP} (TEST's white half minus SELECT2), validated on SELECT2 "
            f"({select2} images); the kept epoch is the best SELECT2 loss. TEST2 is measured "
            "after and chooses nothing.",
            "Each round reruns the recipe (the task2-recipe step's settings when it ran) "
            "beside its levers.",
            "",
            f"Rule, fixed before scoring: a lever is kept when its SELECT2 mean beats the "
            f"recipe's by at least {LEVER_MARGIN_IMAGES} images.",
            "",
        ]
    )


def write_levers(out: str | None = None) -> Path:
    """The `LEVER_ROUND` round (default the newest) of `LEVER_ROUNDS`, `LEVER_SEEDS` seeds
    (default 2), as its own section of reports/levers.md; the other rounds' sections stay."""
    seeds = int(os.environ.get("LEVER_SEEDS", "2"))
    number = os.environ.get("LEVER_ROUND", list(LEVER_ROUNDS)[-1])
    if number not in LEVER_ROUNDS:
        raise ValueError(f"LEVER_ROUND={number}: expected one of {', '.join(LEVER_ROUNDS)}")
    title, levers = LEVER_ROUNDS[number]
    frame = bench_levers(seeds, levers)
    select2 = frame.attrs["select2_images"]
    kept = kept_levers(frame, select2)
    head = _levers_head(select2)
    section = "\n".join(
        [
            f"## Round {number}: {title}",
            "",
            f"Machine: {describe_machine()}. Recipe: {LEVER_RECIPE}; models: {LEVER_MODELS}; "
            f"{seeds} seeds each.",
            "",
            frame.to_markdown(index=False, floatfmt=".4f"),
            "",
            "Kept: "
            + "; ".join(
                f"{model}: {lever or 'none (the recipe alone)'}" for model, lever in kept.items()
            ),
            "",
            "",
        ]
    )
    folder = config.reports_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "levers.md"
    old = markdown_sections(path.read_text())[1].values() if path.exists() else []
    rounds = {_round_number(text): text for text in old if _round_number(text) is not None}
    rounds[int(number)] = section  # a rerun replaces its own section, whatever its title
    path.write_text(head + "\n" + "".join(rounds[n] for n in sorted(rounds)))
    print(f"wrote {path}")
    params = {
        "round": number,
        "seeds": seeds,
        "recipe": LEVER_RECIPE,
        "models": LEVER_MODELS,
        "kept": kept,
        "machine": describe_machine(),
    }
    run_id = store.log_measurement("levers", params, frame, [path])
    print(f"logged to MLflow run {run_id} (experiment levers)")
    return path


def _round_number(section: str) -> int | None:
    """N of a levers.md section headed `## Round N: ...` (None: another section)."""
    found = re.match(r"## Round (\d+)\b", section)
    return int(found.group(1)) if found else None
