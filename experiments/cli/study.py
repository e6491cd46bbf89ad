"""Study commands: `steps`, `train`, `search` and its internal `worker`."""

from __future__ import annotations

import argparse
import json
import os

from experiments.cli.common import PROFILE_CHOICES, add_set, at_least_one
from experiments.core.steps import STEPS
from models import MODELS


def _steps(args: argparse.Namespace) -> None:
    from experiments.core.steps import make_variables

    if args.names:
        print(" ".join(STEPS))
        return
    if args.make:
        for name, value in make_variables().items():
            print(f"{name} := {value}")
        return
    for step in STEPS.values():
        evals = ", ".join(step.eval_sets)
        source = f" ({step.kind} of {step.source})" if step.source else ""
        line = f"{step.name:<13} train {step.train_set:<7} eval {evals:<11} {step.description}"
        print(line + source)
        print(f"{'':<13} labels read by training: {step.label_use}")


def _train(args: argparse.Namespace) -> None:
    from experiments.core.settings import parse_overrides
    from experiments.search.driver import train_once

    if args.data_dir:  # also where a transfer step's pretraining reads TRAIN
        os.environ["DATA_DIR"] = args.data_dir
    user: dict = parse_overrides(args.set or [])
    if args.epochs is not None:
        user["epochs"] = args.epochs
    if args.seed is not None:
        user["seed"] = args.seed
    step, outcome = train_once(args.step, args.model, user, args.data_dir)
    if step.name != args.step:
        print(f"{args.step} trains nothing: trained {step.name} ({', '.join(step.eval_sets)})")
    print(f"run {outcome.run_id} in experiment {step.name}")
    evaluations = [k for k in outcome.metrics if k.endswith("_acc") and k != "best_val_acc"]
    for key in ["best_val_acc", "best_epoch", *evaluations]:
        print(f"  {key:<18} {outcome.metrics[key]:.4f}")


def _budget(args: argparse.Namespace):
    from experiments.core.settings import parse_overrides
    from experiments.search.space import default_budget

    return default_budget(
        args.profile,
        trials=args.trials,
        epochs=args.epochs,
        timeout=args.timeout,
        train_subset=args.train_subset,
        final_epochs=args.final_epochs,
        seed=args.seed,
        score_trials=args.score_trials or None,
        overrides=parse_overrides(args.set or []),
    )


def _search(args: argparse.Namespace) -> None:
    from experiments.core.steps import training_step
    from experiments.reporting.report import row_text
    from experiments.search.driver import run_step
    from experiments.search.plan import StudyPlan
    from experiments.search.study import summary_line

    budget = _budget(args)
    models = args.model or list(MODELS)
    steps = list(dict.fromkeys(args.step))  # in the order given: a chain, sources first
    for name in steps:  # every study's settings are checked before the first one starts
        for model in models:
            StudyPlan.build(training_step(name), model, budget, args.storage)
    for name in steps:  # one process: imports, data cache and threads are set up once
        for model in models:
            result = run_step(name, model, budget, storage_url=args.storage, workers=args.workers)
            print(summary_line(result), flush=True)
        print(row_text(name), flush=True)


def _seeds(args: argparse.Namespace) -> None:
    from experiments.core.statistics import seed_summary
    from experiments.core.steps import get_step
    from experiments.search.seeds import answer_of, plan, run_seeds
    from experiments.tracking import results

    models = args.model or list(MODELS)
    if args.plan:  # the goals, one per line, for make's scheduler (Makefile: full-seeds)
        for step, model, k in plan(args.step, models, args.seeds):
            print(f"{step}.{model}.{k}")
        return
    if len(args.step) > 1:
        raise SystemExit("seeds: one --step at a time (several only with --plan)")
    (step,) = args.step
    evaluated = get_step(step).primary_eval
    for model in models:
        answer_id, _, name = answer_of(step, model)
        for run in run_seeds(step, model, args.seeds, args.only):
            state = "trained" if run.trained else "found"
            acc = run.metrics.get(f"{evaluated}_acc", float("nan"))
            print(
                f"[{name}] seed {run.seed}: run {run.run_id} ({state}), {evaluated}_acc {acc:.4f}"
            )
        values = [results.run_metrics(answer_id).get(f"{evaluated}_acc")]
        for _, run in results.seed_runs(step, model, answer_id).iterrows():  # every seed so far
            values.append(results.metrics_of(run).get(f"{evaluated}_acc", float("nan")))
        print(f"[{name}] {evaluated}_acc over seeds: {seed_summary(values).format()}", flush=True)


def _worker(args: argparse.Namespace) -> None:
    from experiments.search.driver import worker_main
    from experiments.search.space import Budget

    budget = Budget(**json.loads(args.budget))
    worker_main(args.step, args.model, args.quota, args.threads, args.index, budget)


def _add_steps(commands) -> None:
    steps = commands.add_parser("steps", help="list the declared task steps")
    steps.add_argument("--names", action="store_true", help="only the names, on one line")
    steps.add_argument(
        "--make", action="store_true", help="the steps, chains and recipes as make variables"
    )
    steps.set_defaults(func=_steps)


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train one model on one step, logged to MLflow")
    train.add_argument("--step", required=True, choices=list(STEPS))
    train.add_argument("--model", required=True, choices=list(MODELS))
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    add_set(train, "override a setting (repeatable)")
    train.add_argument("--data-dir", help="datasets folder (default: $DATA_DIR, data/raw, shared)")
    train.set_defaults(func=_train)


def _add_budget_options(search: argparse.ArgumentParser) -> None:
    """The options that size a study (experiments/search/space.py: Budget)."""
    search.add_argument("--trials", type=int, help="finished trials the study should hold")
    search.add_argument(
        "--epochs", type=int, help="epochs per trial (default: Budget.trial_images' worth, 2..20)"
    )
    search.add_argument(
        "--train-subset", type=int, help="training images per trial, 0 = all (default 4000)"
    )
    search.add_argument(
        "--final-epochs",
        type=int,
        help="epochs of the best trial's retrain (default: Budget.final_images' worth, capped)",
    )
    search.add_argument(
        "--profile",
        choices=PROFILE_CHOICES,
        default="auto",
        help="the budget: quick (a smoke run of the whole pipeline), cpu (make reproduce on "
        "a 2-core CPU), full (the quality goals), gpu (about 5x cpu's images per study); "
        "auto: gpu where the run's device is CUDA, else cpu (default auto)",
    )
    search.add_argument("--timeout", type=float, help="stop starting new trials after S seconds")
    search.add_argument("--seed", type=int, help="sampler and training seed (default 0)")
    search.add_argument(
        "--score-trials",
        action="store_true",
        help="also score every trial on the evaluation sets (analysis only)",
    )


def _add_search(commands) -> None:
    search = commands.add_parser("search", help="run or resume the Optuna study of (step, model)")
    search.add_argument(
        "--step",
        required=True,
        action="append",
        choices=list(STEPS),
        help="repeatable: the steps' studies run in this order in one process (a chain)",
    )
    search.add_argument(
        "--model",
        action="append",
        choices=list(MODELS),
        help="repeatable: one study per model (default: every registered model)",
    )
    _add_budget_options(search)
    search.add_argument(
        "--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE or mlruns/optuna.journal)"
    )
    add_set(search, "fixed setting for every trial")
    search.add_argument(
        "--workers", type=at_least_one, default=1, help="processes sharing the study (default 1)"
    )
    search.set_defaults(func=_search)


def _add_worker(commands) -> None:
    worker = commands.add_parser("worker", help="(internal) one worker of search --workers")
    worker.add_argument("--step", required=True, choices=list(STEPS))
    worker.add_argument("--model", required=True, choices=list(MODELS))
    worker.add_argument("--quota", type=int, required=True)
    worker.add_argument("--threads", type=int, default=1)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--budget", required=True, help="the launcher's Budget as JSON")
    worker.set_defaults(func=_worker)


def _add_seeds(commands) -> None:
    seeds = commands.add_parser(
        "seeds", help="retrain a finished study's answer with more seeds (only the seed changes)"
    )
    seeds.add_argument(
        "--step", required=True, action="append", choices=list(STEPS), help="repeatable with --plan"
    )
    seeds.add_argument(
        "--model", action="append", choices=list(MODELS), help="repeatable (default: all)"
    )
    seeds.add_argument(
        "--seeds", type=at_least_one, default=2, help="seeds beside the answer's own (default 2)"
    )
    seeds.add_argument(
        "--only", type=at_least_one, help="train only the ONLY-th of the --seeds (one make goal)"
    )
    seeds.add_argument(
        "--plan",
        action="store_true",
        help="print STEP.MODEL.K for each missing seed of the steps and models, longest first",
    )
    seeds.set_defaults(func=_seeds)


def add_commands(commands) -> None:
    for add in (_add_steps, _add_train, _add_search, _add_seeds, _add_worker):
        add(commands)
