"""The Model Registry: each task's champion registered as `glyph-task1` / `glyph-task2`, alias
`champion`, in a format that is safe to load: weights-only checkpoints and an MLmodel naming
this package's loader (`serving/pyfunc_model.py`), no code from the store.

Champion rules, written before any score is read (validation only, never TEST
or TEST2 labels):

- Task 2: the candidates are the study answers of every Task 2 step that
  validated on SELECT2 (the one selection split, which no Task 2 step trains on)
  and the ensembles built from them by a fixed recipe: all answers of each step,
  and all answers together; each with and without test-time augmentation
  (`task2_candidates`). The champion is the candidate with the highest SELECT2
  accuracy; ties: fewer parameters, then fewer members.
- Task 1: among the study answers of task1-step1 (TRAIN only), the one with the
  highest TRAIN validation accuracy; ties: fewer parameters. It ships with the
  new-script detector that scores best on a proxy TRAIN alone provides (its
  validation images against the same images inverted; `detector_of`), its
  threshold the 95th percentile of its score on TRAIN validation images (5 % of
  in-script images refused), so it can answer "unknown".

Re-promoting the same source run with the same rule makes no new version; the
alias `champion` always points at the version of the current champion. Each version
records the sha256 of each of its files (`integrity.DIGEST_TAG`), which `predict` and
`serve` check before MLflow reads the files; a version without that record is registered
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from data_tools import SELECTION, invert, load_split
from experiments.analysis.detectors import (
    MODEL_DETECTORS,
    Mahalanobis,
    logits_and_features,
    model_scores,
    score_shipped,
    shipped,
)
from experiments.analysis.shift import REFUSE_FRACTION
from experiments.core import config
from experiments.core.statistics import auroc, bootstrap_interval, tie_set
from experiments.core.steps import STEPS
from experiments.serving import integrity
from experiments.tracking import results, store
from experiments.training.checkpoint import load_checkpoint, save_atomically
from experiments.training.inference import ProbabilityCache
from experiments.training.runner import log_pyfunc_model, short_digest
from experiments.training.train import dataset_split
from models import count_parameters

REGISTRY_EXPERIMENT = "registry"
DECLARED_DETECTOR = "max_softmax"  # declared in advance; ships when the proxy cannot choose
PROXY_MARGIN = 0.02  # a proxy whose every AUROC is within this of 0.5 cannot choose
ALIAS = "champion"
CHAMPION_STEP = {1: "task1-step1"}
TASK2_STEPS = tuple(name for name, step in STEPS.items() if step.val_set == SELECTION)
RULES = {
    1: "task1-step1 study answer with the highest TRAIN validation accuracy (ties: fewer "
    "parameters); detector: the best of max_softmax / energy / mahalanobis by AUROC on a "
    "TRAIN-only proxy (TRAIN validation vs the same images inverted), threshold = 95th "
    "percentile of its score on TRAIN validation",
    2: "among the Task 2 study answers validated on SELECT2 and their fixed-recipe ensembles "
    "(all answers of a step; all answers), each with and without TTA, the candidates within "
    "the best SELECT2 accuracy's 95 % Wilson interval are tied; the tie is broken by more "
    "members, then fewer parameters, then the name",
}


@dataclass
class Champion:
    task: int
    runs: list[pd.Series]  # the members: one for a single model
    selection_acc: float
    detector: dict | None = None
    label: str = ""  # the candidate's name, e.g. "task2-step3/hybrid" or "all answers (TTA)"
    tta: bool = False
    parameters: int = 0
    selection_n: int = 0  # the images the selection accuracy rests on (SELECT2: 600)

    @property
    def name(self) -> str:
        return f"glyph-task{self.task}"

    @property
    def run(self) -> pd.Series:
        return self.runs[0]

    @property
    def run_id(self) -> str:
        return self.run["run_id"]

    @property
    def run_ids(self) -> list[str]:
        return [r["run_id"] for r in self.runs]


def parameters_of(run: pd.Series) -> int:
    """The run's parameter count: logged when it trained, else counted on its checkpoint."""
    logged = run.get("metrics.parameters")
    if logged is not None and pd.notna(logged):
        return int(logged)
    return count_parameters(load_checkpoint(run["run_id"]).model)


def choose(task: int, candidates: list[Champion] | None = None) -> Champion:
    """The champion of `task` by its rule (validation only; ties: the smaller candidate).
    `candidates`: Task 2's field when the caller has already scored it."""
    if task == 2:
        return best_of(task2_candidates() if candidates is None else candidates)
    step = CHAMPION_STEP[task]
    frame = results.study_models(step)
    if frame.empty:
        raise RuntimeError(f"no {step} study has finished: run `make {step}` first")
    sizes = {model: parameters_of(row) for model, row in frame.iterrows()}
    ranked = sorted(
        frame.index, key=lambda m: (-float(frame.loc[m, "metrics.best_val_acc"]), sizes[m], m)
    )
    run = frame.loc[ranked[0]]
    label = f"{step}/{run['tags.model']}"
    val_n = pd.to_numeric(run.get("params.split.val_images"), errors="coerce")
    champion = Champion(
        task,
        [run],
        float(run["metrics.best_val_acc"]),
        label=label,
        selection_n=0 if pd.isna(val_n) else int(val_n),
    )
    check_selected_on([run], load_split("TRAIN", config.data_dir(), config.cache_dir()))
    champion.detector = detector_of(run["run_id"])
    return champion


def check_selected_on(runs: list[pd.Series], dataset) -> None:
    """Refuse (ValueError, one line) to score or ship a candidate on data other than the data
    it was selected on: its run's logged fingerprint of `dataset.name` against the set that
    DATA_DIR gives now. Runs that logged none are not judged."""
    now = short_digest(dataset.fingerprint)
    for run in runs:
        logged = run.get(f"tags.data.{dataset.name}_fingerprint")
        if isinstance(logged, str) and logged and logged != now:
            label = f"{results.tag(run, 'step')}/{results.tag(run, 'model')}"
            raise ValueError(
                f"promote: {label} (run {run['run_id'][:12]}) was selected on {dataset.name} "
                f"{logged}, but {config.data_dir()} gives {dataset.name} {now}: point DATA_DIR "
                "at the data its study used, or rerun the studies on these data"
            )


def tied(candidates: list[Champion]) -> pd.DataFrame:
    """The Task 2 tie set, champion first: the candidates whose SELECT2 accuracy lies within
    the best one's 95 % interval, in the tie-break order fixed in code
    (`statistics.TIE_BREAK_RULE`). Built from selection numbers only: `tie_set` refuses a
    table that holds any evaluation column."""
    if not candidates:
        raise RuntimeError(
            "no Task 2 study validated on SELECT2 has finished: run `make task2-step3` first"
        )
    table = pd.DataFrame(
        {
            "name": [c.label for c in candidates],
            "select_acc": [c.selection_acc for c in candidates],
            "select_n": [c.selection_n for c in candidates],
            "members": [len(c.runs) for c in candidates],
            "params": [c.parameters for c in candidates],
        }
    )
    return tie_set(table)


def best_of(candidates: list[Champion]) -> Champion:
    """The Task 2 rule: the first of the tie set (`tied`)."""
    first = tied(candidates).iloc[0]["name"]
    return next(c for c in candidates if c.label == first)


def accuracy_on(champion: Champion, split: str) -> float:
    """The champion's accuracy on `split`, measured after it was chosen (never used to choose)."""
    dataset = load_split(split, config.data_dir(), config.cache_dir())
    cache = ProbabilityCache(dataset.images, load_checkpoint, dataset.fingerprint)
    return cache.accuracy(champion.run_ids, champion.tta, dataset.labels)


def candidates_table(
    split: str = "TEST2",
    candidates: list[Champion] | None = None,
    cache: ProbabilityCache | None = None,
    tta: bool = True,
) -> pd.DataFrame:
    """Every Task 2 candidate with its SELECT2 (selection) accuracy and, measured after the
    rule has chosen, its accuracy on `split`; the champion first, then by selection.

    `candidates` / `cache`: the field and `split`'s probabilities when the caller already has
    them. `tta=False` measures the TTA rows on `split` only for the champion (their four
    shifted views are most of the cost); the others' cell is left empty."""
    candidates = task2_candidates() if candidates is None else candidates
    if not candidates:
        return pd.DataFrame()
    ties = tied(candidates)
    champion = best_of(candidates)
    intervals = {
        name: f"[{low:.4f}, {high:.4f}]"
        for name, low, high in zip(
            ties["name"], ties["select_acc_low"], ties["select_acc_high"], strict=True
        )
    }
    if cache is None:
        dataset = load_split(split, config.data_dir(), config.cache_dir())
        cache = ProbabilityCache(dataset.images, load_checkpoint, dataset.fingerprint)
        labels = dataset.labels
    else:
        labels = load_split(split, config.data_dir(), config.cache_dir()).labels
    rows = []
    for candidate in candidates:
        is_champion = candidate.label == champion.label
        measured = not candidate.tta or tta or is_champion
        rows.append(
            {
                "candidate": candidate.label,
                "members": len(candidate.runs),
                "tta": candidate.tta,
                "parameters": candidate.parameters,
                "selection_acc (SELECT2)": candidate.selection_acc,
                "selection_n": candidate.selection_n,
                "tie set": "yes" if candidate.label in intervals else "",
                f"{split}_acc (measured after)": (
                    cache.accuracy(candidate.run_ids, candidate.tta, labels)
                    if measured
                    else float("nan")
                ),
                f"{split}_n": len(labels),
                "champion": is_champion,
            }
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values(
        ["champion", "selection_acc (SELECT2)", "parameters"], ascending=[False, False, True]
    ).reset_index(drop=True)


EVALUATED = {1: "TEST", 2: "TEST2"}


def evaluation_metrics(champion: Champion) -> dict[str, float]:
    """What the promote run logs beside the model, measured after the choice: the selection
    accuracy and the task's evaluation accuracy (Task 1: with the detector's measures)."""
    split = EVALUATED[champion.task]
    metrics = {"selection_acc": champion.selection_acc}
    if champion.task == 1 and champion.detector:
        measured = task1_measures(champion)
        metrics.update(
            {k if k.startswith(split) else f"{split}_{k}": v for k, v in measured.items()}
        )
    else:
        metrics[f"{split}_acc"] = accuracy_on(champion, split)
    return metrics


def task2_answers() -> list[pd.Series]:
    """The study answers of the Task 2 steps whose runs validated on SELECT2."""
    answers = []
    for step in TASK2_STEPS:
        frame = results.study_models(step)
        if frame.empty or "params.split.val_set" not in frame:
            continue
        answers += [row for _, row in frame.iterrows() if row["params.split.val_set"] == SELECTION]
    return answers


def answer_seeds(answers: list[pd.Series]) -> list[pd.Series]:
    """The COMPLETE seed runs of the answers (`make seeds`), answer by answer."""
    return [
        row
        for answer in answers
        for _, row in results.seed_runs(
            results.tag(answer, "step"), results.tag(answer, "model"), answer["run_id"]
        ).iterrows()
    ]


def task2_candidates() -> list[Champion]:
    """Every Task 2 candidate of the fixed recipe, scored on SELECT2 (its labels: allowed in
    Task 2 and never trained on by any Task 2 step). TEST2 is not read."""
    answers = task2_answers()
    if not answers:
        return []
    selection = load_split(SELECTION, config.data_dir(), config.cache_dir())
    check_selected_on(answers, selection)
    sizes = {row["run_id"]: parameters_of(row) for row in answers}
    cache = ProbabilityCache(selection.images, load_checkpoint, selection.fingerprint)

    groups: list[tuple[str, list[pd.Series]]] = [
        (f"{results.tag(r, 'step')}/{results.tag(r, 'model')}", [r]) for r in answers
    ]
    steps = list(dict.fromkeys(results.tag(r, "step") for r in answers))
    for step in steps:
        members = [r for r in answers if results.tag(r, "step") == step]
        if len(members) > 1:
            groups.append((f"{step}: all {len(members)} answers", members))
    if len(steps) > 1:
        groups.append((f"all {len(answers)} Task 2 answers", answers))
    seeds = answer_seeds(answers)
    if seeds:  # `make seeds`: each answer again with only the seed changed
        check_selected_on(seeds, selection)
        sizes.update({row["run_id"]: parameters_of(row) for row in seeds})
        label = f"all {len(answers)} Task 2 answers and their {len(seeds)} seed runs"
        groups.append((label, answers + seeds))
    candidates = []
    for label, members in groups:
        for tta in (False, True):
            run_ids = [r["run_id"] for r in members]
            accuracy = cache.accuracy(run_ids, tta, selection.labels)
            candidates.append(
                Champion(
                    2,
                    members,
                    accuracy,
                    label=f"{label}{' (TTA)' if tta else ''}",
                    tta=tta,
                    parameters=sum(sizes[r["run_id"]] for r in members),
                    selection_n=len(selection.labels),
                )
            )
    return candidates


# Bump when `fit_detector` changes what it computes: cached detectors of another recipe are
# not read (the cache key holds this, the run, TRAIN's fingerprint and the constants).
DETECTOR_RECIPE = 1


def detector_of(run_id: str, fit_images: int = 6000) -> dict:
    """The Task 1 detector of `run_id` (`fit_detector`), from the cache when this recipe has
    fitted it on these TRAIN images before: the report and every `make promote` ask for it,
    and fitting runs the model over about 17,000 images. The cache holds tensors, numbers and
    text only (`torch.load(weights_only=True)`); an entry that does not load is refitted."""
    train = load_split("TRAIN", config.data_dir(), config.cache_dir())
    recipe = (DETECTOR_RECIPE, fit_images, REFUSE_FRACTION, PROXY_MARGIN, MODEL_DETECTORS)
    key = hashlib.sha256(f"{run_id}|{train.fingerprint}|{recipe}".encode()).hexdigest()[:24]
    path = config.cache_dir() / "detectors" / f"{key}.pt"
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(cached, dict) and {"name", "threshold"} <= cached.keys():
            return cached
        print(f"{path}: not a detector; refitting it", file=sys.stderr, flush=True)
    except FileNotFoundError:
        pass
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        print(f"{path}: unreadable cached detector ({exc}); refitting it", file=sys.stderr)
    detector = fit_detector(run_id, train, fit_images)
    save_atomically(detector, path)
    return detector


def fit_detector(run_id: str, train, fit_images: int) -> dict:
    """The Task 1 detector, chosen and calibrated with TRAIN alone.

    Proxy for the unseen new script: the run's TRAIN validation images (in-script)
    against the same images inverted (a script shift built from TRAIN: the new
    script is drawn dark on light). Each model-based detector is scored by its
    AUROC on that proxy; the best ships (ties: the declared order). Its threshold
    refuses REFUSE_FRACTION of the TRAIN validation images. Mahalanobis is fitted
    on `fit_images` of the run's TRAIN training split. No TEST image is read.
    """
    loaded = load_checkpoint(run_id)
    cfg = loaded.checkpoint["config"]
    train_idx, val_idx = dataset_split(train, cfg["val_fraction"], cfg["split_seed"])
    generator = torch.Generator().manual_seed(0)
    fit_idx = train_idx[torch.randperm(len(train_idx), generator=generator)[:fit_images]]
    _, fit_features = logits_and_features(loaded, train.images[fit_idx])
    maha = Mahalanobis.fit(fit_features, train.labels[fit_idx])
    inside = model_scores(*logits_and_features(loaded, train.images[val_idx]), maha)
    outside = model_scores(*logits_and_features(loaded, invert(train.images[val_idx])), maha)
    truth = np.r_[np.zeros(len(val_idx)), np.ones(len(val_idx))]
    proxy = {
        name: float(roc_auc_score(truth, np.r_[inside[name], outside[name]]))
        for name in MODEL_DETECTORS
    }
    # A model that turns every image black-background undoes the inversion, and then no
    # detector can separate the proxy's two sides: the declared default ships instead.
    informative = (
        cfg.get("polarity") != "to_black"
        and max(abs(a - 0.5) for a in proxy.values()) >= PROXY_MARGIN
    )
    if informative:
        name = max(MODEL_DETECTORS, key=lambda n: (proxy[n], -MODEL_DETECTORS.index(n)))
    else:
        name = DECLARED_DETECTOR
    threshold = float(np.quantile(inside[name], 1 - REFUSE_FRACTION))
    return shipped(
        name,
        threshold,
        maha,
        refuse_fraction=REFUSE_FRACTION,
        proxy="TRAIN validation vs the same images inverted",
        proxy_auroc=proxy,
        chosen_by="proxy AUROC" if informative else "declared default (proxy uninformative)",
    )


def task1_measures(champion: Champion) -> dict[str, float]:
    """The Task 1 champion on TEST, measured after it was chosen: accuracy, the detector's
    AUROC for the new script (TEST's white half), coverage and accuracy on the answered."""
    test = load_split("TEST", config.data_dir(), config.cache_dir())
    loaded = load_checkpoint(champion.run_id)
    score = score_shipped(champion.detector, loaded, test.images).numpy()
    logged = ProbabilityCache(test.images, lambda run_id: loaded, test.fingerprint)
    predictions = logged(champion.run_id, False).argmax(1)  # read back, not predicted again
    correct = (predictions == test.labels).numpy()
    answered = score <= champion.detector["threshold"]
    is_new = test.white.numpy()
    found = bootstrap_interval((is_new, score), auroc)  # over TEST's images
    return {
        "TEST_acc": float(correct.mean()),
        "TEST_n": float(len(correct)),
        "auroc": float(roc_auc_score(is_new, score)),
        "auroc_ci_low": found.low,
        "auroc_ci_high": found.high,
        "coverage": float(answered.mean()),
        "answered_acc": float(correct[answered].mean()) if answered.any() else float("nan"),
        "answered_n": float(answered.sum()),
    }


def _key(champion: Champion) -> str:
    detector = champion.detector or {}
    summary = {k: v for k, v in detector.items() if not isinstance(v, torch.Tensor)}
    text = f"{champion.run_ids}|{champion.tta}|{RULES[champion.task]}|{sorted(summary.items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def promote(task: int) -> tuple[Champion, str, bool]:
    """Register the champion of `task` (once per source run and rule); point `champion` at it.

    Returns the champion, its version and whether a new version was made.
    """
    champion = choose(task)
    store.init()
    with promotion_lock():
        return _promote_locked(champion)


@contextlib.contextmanager
def promotion_lock() -> Iterator[None]:
    """One promote at a time per store (a file lock beside it, freed when its holder dies):
    two at once cannot both register a version of one promotion key. A promote run left
    RUNNING by a process that died (kill -9) is ended KILLED by the next holder."""
    from filelock import FileLock

    folder = config.mlruns_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "promote.lock")):
        for run_id in results.running_runs(REGISTRY_EXPERIMENT):
            client = MlflowClient()
            store.mark_interrupted(client, run_id, results.last_logged(client, run_id))
        yield


def _promote_locked(champion: Champion) -> tuple[Champion, str, bool]:
    client = MlflowClient()
    key = _key(champion)
    existing = [  # a version without recorded file digests cannot be served: register anew
        v
        for v in client.search_model_versions(f"name = '{champion.name}'")
        if v.tags.get("promotion_key") == key and v.tags.get(integrity.DIGEST_TAG)
    ]
    created = not existing
    version = existing[0].version if existing else _register(champion, key)
    if existing and not results.run_metrics(existing[0].run_id):
        # a version promoted before its run logged the champion's numbers: add them now
        for name, value in evaluation_metrics(champion).items():
            client.log_metric(existing[0].run_id, name, value)
    client.set_registered_model_alias(champion.name, ALIAS, version)
    return champion, str(version), created


def _register(champion: Champion, key: str) -> str:
    checkpoints = [load_checkpoint(run_id).checkpoint for run_id in champion.run_ids]
    if champion.detector:
        checkpoints[0] = {**checkpoints[0], "detector": champion.detector}
    steps = sorted({results.tag(r, "step") for r in champion.runs})
    models = [results.tag(r, "model") for r in champion.runs]
    fingerprints = {
        k[len("tags.") :]: v
        for run in champion.runs
        for k, v in run.items()
        if str(k).startswith("tags.data.") and isinstance(v, str)
    }
    tags = {
        "selection_rule": RULES[champion.task],
        "selection_acc": f"{champion.selection_acc:.6f}",
        "candidate": champion.label,
        "step": ",".join(steps),
        "model": ",".join(models),
        "members": str(len(champion.runs)),
        "tta": str(champion.tta).lower(),
        "source_run": ",".join(champion.run_ids),
        "promotion_key": key,
        **fingerprints,
        "git_commit": store.environment_tags()["git_commit"],
    }
    if champion.detector:
        tags["detector"] = champion.detector["name"]
        tags["detector_threshold"] = f"{champion.detector['threshold']:.6f}"
        tags["detector_proxy"] = champion.detector["proxy"]
        tags["detector_chosen_by"] = champion.detector["chosen_by"]
        for name, auroc in champion.detector["proxy_auroc"].items():
            tags[f"detector_proxy_auroc.{name}"] = f"{auroc:.4f}"
    experiment = store.experiment_id(REGISTRY_EXPERIMENT)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(experiment_id=experiment, run_name=f"promote-{champion.name}", tags=tags),
    ):
        paths = []
        for i, checkpoint in enumerate(checkpoints):
            path = Path(tmp) / f"model_{i}.pt"
            torch.save(checkpoint, path)
            paths.append(path)
        single = len(paths) == 1 and not champion.tta
        log_pyfunc_model(paths[0] if single else paths, tta=champion.tta)
        mlflow.log_metrics(evaluation_metrics(champion))  # measured after the choice
        uri = f"runs:/{mlflow.active_run().info.run_id}/model"
    version = mlflow.register_model(uri, champion.name, tags=tags)
    with tempfile.TemporaryDirectory(prefix="glyph-register-") as scratch:
        integrity.record(champion.name, str(version.version), Path(scratch))
    MlflowClient().update_model_version(
        champion.name,
        version.version,
        description=f"Champion: {champion.label}. Rule: {RULES[champion.task]}.",
    )
    return str(version.version)
