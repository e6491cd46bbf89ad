"""Task 1 without TEST labels: detect the new script, and abstain on it.

Reads a TRAIN-trained model (the `final` run of a task1-step1 study), TRAIN
(labels allowed) and the TEST *images*. TEST labels and TEST's background
halves are used only to measure, never to fit or to choose a threshold.

Detectors (a higher score means "new script"):
  background     the background rule: mean of the outer pixel ring;
  max_softmax    1 - the model's top softmax probability;
  energy         -logsumexp(logits) (Liu et al., 2020);
  mahalanobis    distance of the penultimate features to the nearest TRAIN class
                 mean under a shared covariance (Lee et al., 2018), fitted on TRAIN.

Selective prediction: each model-based detector's threshold is the 95th
percentile of its scores on TRAIN validation images (so ~5 % of in-script
images are refused); the background rule keeps its own threshold (0.5). The
model answers only the TEST images a detector accepts.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from torch import nn

from data_tools import Dataset, border_mean, load_split
from data_tools.datasets import WHITE_BORDER_THRESHOLD
from experiments.analysis.detectors import Mahalanobis, logits_and_features, model_scores
from experiments.core import config
from experiments.core.statistics import accuracy_interval, auroc, bootstrap_interval
from experiments.tracking import results, store
from experiments.training.checkpoint import Loaded, load_checkpoint
from experiments.training.evaluation import accuracy_metrics
from experiments.training.inference import predict_logits
from experiments.training.train import Stepper, dataset_split, train_one_epoch

SHIFT_EXPERIMENT = "task1-shift"
SOURCE_STEP = "task1-step1"

REFUSE_FRACTION = 0.05  # of in-script (TRAIN validation) images, sets the model-based thresholds


def detector_scores(
    logits: torch.Tensor, features: torch.Tensor, images: torch.Tensor, maha: Mahalanobis
):
    return {"background": border_mean(images).numpy(), **model_scores(logits, features, maha)}


@dataclass
class ShiftResult:
    metrics: dict[str, float]
    thresholds: dict[str, float]


def analyse(
    loaded: Loaded, train_set: Dataset, test_set: Dataset, fit_images: int = 6000
) -> ShiftResult:
    """AUROC of each detector for TEST's new script, and selective accuracy/coverage on TEST."""
    cfg = loaded.checkpoint["config"]
    train_idx, val_idx = dataset_split(train_set, cfg["val_fraction"], cfg["split_seed"])
    generator = torch.Generator().manual_seed(0)
    fit_idx = train_idx[torch.randperm(len(train_idx), generator=generator)[:fit_images]]
    _, fit_features = logits_and_features(loaded, train_set.images[fit_idx])
    maha = Mahalanobis.fit(fit_features, train_set.labels[fit_idx])

    val_logits, val_features = logits_and_features(loaded, train_set.images[val_idx])
    val_scores = detector_scores(val_logits, val_features, train_set.images[val_idx], maha)
    thresholds = {
        name: float(np.quantile(s, 1 - REFUSE_FRACTION)) for name, s in val_scores.items()
    }
    thresholds["background"] = WHITE_BORDER_THRESHOLD

    logits, features = logits_and_features(loaded, test_set.images)
    scores = detector_scores(logits, features, test_set.images, maha)
    is_new = test_set.white.numpy()  # measuring only
    labels = test_set.labels.numpy()
    correct = logits.argmax(1).numpy() == labels
    metrics = {
        **accuracy_metrics("TEST", correct),
        **(accuracy_metrics("TEST_black", correct[~is_new]) if (~is_new).any() else {}),
        **(accuracy_metrics("TEST_white", correct[is_new]) if is_new.any() else {}),
    }
    for name, score in scores.items():
        if is_new.any() and (~is_new).any():
            metrics[f"auroc_{name}"] = float(roc_auc_score(is_new, score))
            found = bootstrap_interval((is_new, np.asarray(score)), auroc)  # over images
            metrics[f"auroc_{name}_ci_low"], metrics[f"auroc_{name}_ci_high"] = (
                found.low,
                found.high,
            )
        accepted = score <= thresholds[name]
        metrics.update(_with_interval(f"coverage_{name}", accepted))
        if accepted.any():
            metrics.update(_with_interval(f"selective_acc_{name}", correct[accepted]))
        else:
            metrics[f"selective_acc_{name}"] = float("nan")
        if is_new.any():
            metrics.update(_with_interval(f"new_script_accepted_{name}", accepted[is_new]))
    return ShiftResult(metrics, thresholds)


def _with_interval(name: str, hits: np.ndarray) -> dict[str, float]:
    """`name` (the mean of a boolean per-image array), its 95 % Wilson interval and `name_n`."""
    found = accuracy_interval(int(hits.sum()), len(hits))
    return {
        name: found.estimate,
        f"{name}_ci_low": found.low,
        f"{name}_ci_high": found.high,
        f"{name}_n": float(len(hits)),
    }


def _halves_with_intervals(
    prefix: str, correct: np.ndarray, white: np.ndarray, suffix: str = "_acc"
) -> dict[str, float]:
    """`<prefix>_TEST<suffix>` over all images and each background half's (`white`, `black`),
    each with its 95 % Wilson interval and image count (a half without images: NaN)."""
    metrics = {}
    white = np.asarray(white, dtype=bool)
    for part, keep in (("TEST", np.ones_like(white)), ("white", white), ("black", ~white)):
        name = f"{prefix}_{part}{suffix}"
        metrics.update(_with_interval(name, correct[keep]) if keep.any() else {name: float("nan")})
    return metrics


K_SHOTS = (1, 5, 20, 100)
SHOT_COPIES = 500  # the k-shot images repeated to about this many, then as many TRAIN images


def sample_k_shot(test_set: Dataset, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k labelled images per class from TEST's new script (white half), and every other TEST index.

    The second index set is where the fine-tuned model is evaluated: it never
    holds an image the model was fine-tuned on.
    """
    generator = torch.Generator().manual_seed(seed)
    white = test_set.white
    chosen = []
    for label in range(int(test_set.labels.max()) + 1):
        pool = torch.nonzero(white & (test_set.labels == label)).flatten()
        chosen.append(pool[torch.randperm(len(pool), generator=generator)[:k]])
    shots = torch.cat(chosen).sort().values
    rest = torch.ones(len(test_set), dtype=torch.bool)
    rest[shots] = False
    return shots, torch.nonzero(rest).flatten()


def fine_tune(
    loaded: Loaded, images: torch.Tensor, labels: torch.Tensor, replay: Dataset, seed: int = 0
) -> nn.Module:
    """A copy of the model fine-tuned on the k-shot images plus as many TRAIN images (replay).

    A fixed recipe (Adam 3e-4, 8 passes over ~1,000 images), so nothing is chosen
    by looking at evaluation labels.
    """
    generator = torch.Generator().manual_seed(seed)
    repeats = max(1, SHOT_COPIES // len(labels))
    replay_idx = torch.randperm(len(replay), generator=generator)[: len(labels) * repeats]
    x = torch.cat([images.repeat(repeats, 1, 1, 1), replay.images[replay_idx]])
    y = torch.cat([labels.repeat(repeats), replay.labels[replay_idx]])
    model = copy.deepcopy(loaded.model)
    device = next(model.parameters()).device
    prep = loaded.preprocessing
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    augment = prep.augmenter()
    xs, ys = prep.transform(x).to(device), y.to(device)
    for _ in range(8):
        train_one_epoch(
            Stepper(model, optimizer, nn.CrossEntropyLoss(), 64, generator, augment=augment), xs, ys
        )
    return model.eval()


def label_efficiency(
    loaded: Loaded,
    train_set: Dataset,
    test_set: Dataset,
    ks: tuple[int, ...] = K_SHOTS,
    seed: int = 0,
) -> dict[str, float]:
    """TEST accuracy on the images not used for fine-tuning, after k labelled new-script images per class."""
    metrics = {}
    for k in ks:
        shots, rest = sample_k_shot(test_set, k, seed)
        model = fine_tune(loaded, test_set.images[shots], test_set.labels[shots], train_set, seed)
        device = next(model.parameters()).device
        logits = predict_logits(
            model, loaded.preprocessing.transform(test_set.images[rest]).to(device)
        ).cpu()
        correct = (logits.argmax(1) == test_set.labels[rest]).numpy()
        metrics.update(
            _halves_with_intervals(f"k{k}", correct, test_set.white[rest].numpy(), "_rest_acc")
        )
    return metrics


CONFIDENCE = 0.95  # self-training keeps pseudo-labels at least this confident (a fixed recipe)
SELF_TRAIN_ROUNDS = 3


def self_train(
    loaded: Loaded,
    train_set: Dataset,
    test_images: torch.Tensor,
    rounds: int = SELF_TRAIN_ROUNDS,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Self-training on unlabelled TEST images: pseudo-label what the model is confident about,
    fine-tune on those plus as many TRAIN images (replay), repeat.

    A fixed recipe (threshold 0.95, 3 rounds, Adam 3e-4, 2 passes per round, at
    most as many pseudo-labels per class as the rarest confident class has), so
    nothing is chosen by looking at TEST labels. Returns the adapted model and,
    per round, how many images were pseudo-labelled (no accuracy: that needs labels).
    """
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(loaded.model)
    device = next(model.parameters()).device
    prep = loaded.preprocessing
    x_test = prep.transform(test_images).to(device)
    augment = prep.augmenter()
    log = []
    for round_index in range(rounds):
        probabilities = predict_logits(model, x_test).softmax(1).cpu()
        confident, predicted = probabilities.max(1)
        keep = torch.nonzero(confident >= confidence).flatten()
        counts = torch.bincount(predicted[keep], minlength=probabilities.shape[1])
        per_class = int(counts[counts > 0].min()) if (counts > 0).any() else 0
        chosen = []
        for label in range(probabilities.shape[1]):  # class-balanced: no class swamps the rest
            pool = keep[predicted[keep] == label]
            chosen.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
        pseudo = torch.cat(chosen)
        log.append({"round": round_index, "pseudo_labelled": len(pseudo), "per_class": per_class})
        if len(pseudo) == 0:
            break
        replay_idx = torch.randperm(len(train_set), generator=generator)[: len(pseudo)]
        xs = torch.cat([x_test[pseudo], prep.transform(train_set.images[replay_idx]).to(device)])
        ys = torch.cat([predicted[pseudo], train_set.labels[replay_idx]]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        for _ in range(2):
            train_one_epoch(
                Stepper(model, optimizer, nn.CrossEntropyLoss(), 64, generator, augment=augment),
                xs,
                ys,
            )
        log[-1]["ids"], log[-1]["labels"] = pseudo, predicted[pseudo]  # for measuring only
    return model.eval(), log


def adaptation(
    loaded: Loaded, train_set: Dataset, test_set: Dataset, seed: int = 0
) -> dict[str, float]:
    """Unsupervised adaptation, measured: self-training, and k-means on the new script's features.

    TEST labels are read only after the fact, to score: the adapted model's
    accuracy, the pseudo-labels' accuracy, and the k-means clusters' purity (the
    accuracy a client would get by naming each of the 6 clusters with one label).
    """
    model, log = self_train(loaded, train_set, test_set.images, seed=seed)
    device = next(model.parameters()).device
    logits = predict_logits(model, loaded.preprocessing.transform(test_set.images).to(device))
    correct = (logits.argmax(1).cpu() == test_set.labels).numpy()
    metrics = _halves_with_intervals("selftrain", correct, test_set.white.numpy())
    for entry in log:
        r = entry["round"]
        metrics[f"selftrain_round{r}_pseudo_labelled"] = float(entry["pseudo_labelled"])
        ids = entry.get("ids")
        if ids is not None and len(ids):
            right = (entry["labels"] == test_set.labels[ids]).numpy()
            on_white = test_set.white[ids].numpy()
            metrics[f"selftrain_round{r}_pseudo_acc"] = float(right.mean())
            metrics[f"selftrain_round{r}_pseudo_white_share"] = float(on_white.mean())
            if on_white.any():
                metrics[f"selftrain_round{r}_pseudo_white_acc"] = float(right[on_white].mean())
    # k-means on the penultimate features of the images the background rule calls new (no labels)
    new = is_new_by_background(test_set.images)
    if int(new.sum()) >= 6:
        _, features = logits_and_features(loaded, test_set.images[new])
        clusters = KMeans(n_clusters=6, n_init=10, random_state=seed).fit_predict(features.numpy())
        truth = test_set.labels[new].numpy()
        metrics["kmeans_new_purity"] = cluster_purity(truth, clusters)
        metrics["kmeans_new_ari"] = float(adjusted_rand_score(truth, clusters))
    return metrics


def cluster_purity(truth: np.ndarray, clusters: np.ndarray) -> float:
    """Share of images whose label is their cluster's majority label."""
    majority = sum(np.bincount(truth[clusters == c]).max() for c in np.unique(clusters))
    return float(majority / len(truth))


def is_new_by_background(images: torch.Tensor) -> torch.Tensor:
    return border_mean(images) > WHITE_BORDER_THRESHOLD


def _final_run(model: str) -> str:
    run = results.final_run(SOURCE_STEP, model)
    if run is None:
        raise RuntimeError(
            f"no {SOURCE_STEP} final run for {model}: run `make {SOURCE_STEP} MODELS={model}` first"
        )
    return run["run_id"]


def run_shift(
    models: tuple[str, ...], curve: bool = True, adapt: bool = True
) -> dict[str, ShiftResult]:
    """Analyse each model's task1-step1 final run and log a `task1-shift` run per model."""
    root, cache = config.data_dir(), config.cache_dir()
    train_set, test_set = load_split("TRAIN", root, cache), load_split("TEST", root, cache)
    analysed = {}
    for model in models:
        source = _final_run(model)
        loaded = load_checkpoint(source)
        result = analyse(loaded, train_set, test_set)
        if adapt:
            result.metrics.update(adaptation(loaded, train_set, test_set))
        if curve:
            result.metrics.update(label_efficiency(loaded, train_set, test_set, K_SHOTS))
        analysed[model] = result
        _log(model, source, result)
    return analysed


def _log(model: str, source: str, result: ShiftResult) -> None:
    tags = {
        "model": model,
        "step": SHIFT_EXPERIMENT,
        "source_run": source,
        "state": "COMPLETE",
        "label_use": (
            "TRAIN labels; TEST images unlabelled; TEST labels and halves for measuring only; "
            f"the label-efficiency rows use k in {K_SHOTS} TEST labels per class"
        ),
        **store.environment_tags(),
    }
    experiment = store.experiment_id(SHIFT_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment, run_name=f"shift-{model}", tags=tags):
        mlflow.log_params({f"threshold.{k}": round(v, 6) for k, v in result.thresholds.items()})
        mlflow.log_param("refuse_fraction", REFUSE_FRACTION)
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if np.isfinite(v)})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "shift.json"
            path.write_text(
                json.dumps({"metrics": result.metrics, "thresholds": result.thresholds}, indent=1)
            )
            mlflow.log_artifact(str(path))
