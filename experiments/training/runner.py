"""One tracked training run: load a step's data, fit, score every evaluation set, log it all.

Used by `python -m experiments train` and by every trial of a search. The run
ends FINISHED only when training and scoring completed; a pruned trial ends
KILLED, an error FAILED, each tagged with its `state` (and the reason).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric

from data_tools import DERIVED, Dataset, DatasetError, load_splits
from experiments.core import config
from experiments.core.settings import TrainConfig, resolve_device
from experiments.core.steps import Step
from experiments.tracking import results, store
from experiments.training import predictions
from experiments.training.checkpoint import load_checkpoint, make_checkpoint
from experiments.training.evaluation import plot_confusion, plot_curves, plot_misclassified
from experiments.training.evaluation import score as score_set
from experiments.training.graphs import graphs_requested
from experiments.training.inference import SHIFTS, forward_flops, probabilities
from experiments.training.train import Diverged, FitResult, dataset_split, fit
from models import count_parameters


@dataclass
class StepData:
    step: Step
    train_set: Dataset  # with a val_set: already without the val_set's images
    eval_sets: dict[str, Dataset]
    val_set: Dataset | None = None  # None: validate on a split of train_set

    @property
    def data_key(self) -> str:
        """The data a run of this step sees (training and validation sets): part of every key
        that finds a run again, so other data never reuses a final or a baseline."""
        val = self.val_set.fingerprint if self.val_set is not None else ""
        # a split that keeps groups together (TRAIN2) is other data than the image-by-image
        # split an older store's runs saw: they are not found again, a study says so
        grouped = (
            "|grouped split" if self.val_set is None and self.train_set.groups is not None else ""
        )
        text = f"{self.train_set.fingerprint}|{val}{grouped}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def train_images(self) -> int:
        """Images a final trains on at the default `val_fraction` (`training_images`)."""
        return self.training_images()

    def training_images(self, val_fraction: float | None = None) -> int:
        """Images a final trains on: all of train_set with a val_set, else its training split
        at `val_fraction` (None: the default), counted as `fit` splits (whole groups)."""
        if self.val_set is not None:
            return len(self.train_set)
        fraction = TrainConfig.val_fraction if val_fraction is None else val_fraction
        return len(dataset_split(self.train_set, fraction, seed=0)[0])


def load_step_data(step: Step, data_dir: str | Path | None = None) -> StepData:
    """The training set and the evaluation sets of a step, through the dataset cache.

    Every set is read and checked before any cache entry is written.
    """
    val = [step.val_set] if step.val_set else []
    names = list(dict.fromkeys([step.train_set, *step.eval_sets, *val]))
    loaded = load_splits(names, config.data_dir(data_dir), config.cache_dir())
    train = loaded[step.train_set]
    val_set = loaded[step.val_set] if step.val_set else None
    if val_set is not None:
        train = train.without(val_set)  # no image of the selection split is trained on
        if len(train) == 0:
            raise DatasetError(
                _source_folder(step.train_set),
                f"{train.name} is empty: every image of {step.train_set} is also in "
                f"{step.val_set}, which no step trains on",
            )
    return StepData(step, train, {n: loaded[n] for n in step.eval_sets}, val_set)


@dataclass
class RunOutcome:
    run_id: str
    metrics: dict[str, float]
    result: FitResult


def _source_folder(name: str) -> Path:
    """The raw folder a set is read from (the datasets folder for one made of several)."""
    sources = DERIVED[name][0] if name in DERIVED else (name,)
    return config.data_dir() / sources[0] if len(sources) == 1 else config.data_dir()


def short_digest(fingerprint: str) -> str:
    """16 hex digits naming a set: a raw folder's own digest, a derived set's hashed recipe
    (a derived fingerprint starts with its source's digest, so a prefix would not tell them
    apart)."""
    if "|" not in fingerprint:
        return fingerprint[:16]
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def log_inputs(data: StepData, cfg: TrainConfig) -> None:
    """The run's data lineage: its training, validation and evaluation sets as MLflow dataset
    inputs, each with the project's data fingerprint as its digest."""
    train, step = data.train_set, data.step
    if data.val_set is not None:
        validation = (data.val_set.name, data.val_set.fingerprint, step.val_set)
    else:
        split = f"val_fraction={cfg.val_fraction},split_seed={cfg.split_seed}"
        digest = hashlib.sha256(f"{train.fingerprint}|{split}".encode()).hexdigest()
        validation = (f"{train.name} validation split", digest, step.train_set)
    sets = [  # (name, fingerprint, the declared set it is read from, context)
        (train.name, train.fingerprint, step.train_set, "train"),
        (*validation, "validation"),
        *((name, ds.fingerprint, name, "evaluation") for name, ds in data.eval_sets.items()),
    ]
    with warnings.catch_warnings():  # a local folder matches two equivalent source types
        warnings.simplefilter("ignore", UserWarning)
        for name, digest, declared, context in sets:
            dataset = MetaDataset(
                resolve_dataset_source(str(_source_folder(declared))),
                name=name,
                digest=short_digest(digest),
            )
            store.log_input(dataset, context=context)


def _epoch_sink(row: dict[str, float]) -> None:
    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def run_tags(data: StepData, cfg: TrainConfig) -> dict[str, str]:
    step = data.step
    tags = {
        "step": step.name,
        "model": cfg.model,
        "train_set": step.train_set,
        "eval_sets": ",".join(step.eval_sets),
        "label_use": step.label_use,
        "seed": str(cfg.seed),
        f"data.{step.train_set}_fingerprint": short_digest(data.train_set.fingerprint),
        **store.environment_tags(),
    }
    for name, dataset in data.eval_sets.items():
        tags[f"data.{name}_fingerprint"] = short_digest(dataset.fingerprint)
    if data.val_set is not None:
        tags["val_set"] = data.val_set.name
        tags[f"data.{data.val_set.name}_fingerprint"] = short_digest(data.val_set.fingerprint)
    return tags


def train_and_log(
    data: StepData,
    cfg: TrainConfig,
    run_name: str,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch: Iterable[Callable[[dict[str, float]], None]] = (),
    log_figures: bool = True,
    on_start: Callable[[str], None] | None = None,
    score: bool = True,
    log_model: bool = False,
    resumable: bool = False,
) -> RunOutcome:
    """Train `cfg` on the step's training set and leave a complete run in MLflow.
    `resumable`: keep the training state after each epoch (`resume_path`), so that this run,
    interrupted, continues at its next epoch when the same settings on the same data train
    again; the state is deleted once the run is complete."""
    resume = resume_path(data, cfg) if resumable else None
    experiment = store.experiment_id(data.step.name)
    run = mlflow.start_run(
        experiment_id=experiment,
        run_name=run_name,
        parent_run_id=parent_run_id,
        tags={**run_tags(data, cfg), **(extra_tags or {})},
    )
    try:
        if on_start is not None:
            on_start(run.info.run_id)
        log_inputs(data, cfg)
        mlflow.log_params(cfg.flat())
        result = fit(
            cfg,
            data.train_set,
            on_epoch=[_epoch_sink, *on_epoch],
            label=run_name,
            val_set=data.val_set,
            resume=resume,
        )
        mlflow.log_params({f"split.{k}": v for k, v in result.split.items() if k not in cfg.flat()})
        metrics, evaluations = _score(data, result, score)
        mlflow.log_metrics(metrics)
        _log_artifacts(data, cfg, result, metrics, evaluations, log_figures, log_model)
    except BaseException as exc:
        _end_with(exc)
        raise
    mlflow.set_tag("state", "COMPLETE")
    mlflow.end_run("FINISHED")
    if resume is not None:
        resume.unlink(missing_ok=True)
    return RunOutcome(run.info.run_id, metrics, result)


def resume_path(data: StepData, cfg: TrainConfig) -> Path:
    """Where a resumable run keeps its state: `config.resume_dir()` (`RESUME_DIR`, default
    `CACHE_DIR/resume`), keyed by the run's settings, its data, the device it resolves to
    and, on CUDA, `GLYPH_CUDA_GRAPHS`, so only the same training continues from it."""
    device = resolve_device(cfg.device).type
    engine = {"device": device, "graphs": device == "cuda" and graphs_requested()}
    text = json.dumps({**cfg.flat(), **engine, "data": data.data_key}, sort_keys=True, default=str)
    return config.resume_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt"


def _score(data: StepData, result, score: bool) -> tuple[dict[str, float], dict]:
    """The run's summary metrics and, when `score`, its scores on every evaluation set."""
    metrics = {
        "best_val_acc": result.best_val_acc,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "parameters": count_parameters(result.model),
    }
    evaluations = {
        name: score_set(result.model, result.preprocessing, ds, result.device)
        for name, ds in (data.eval_sets.items() if score else ())
    }
    for evaluation in evaluations.values():
        metrics.update(evaluation.metrics)
    metrics.update(compute(result, sum(len(data.eval_sets[name]) for name in evaluations)))
    return metrics, evaluations


def compute(result: FitResult, scored_images: int) -> dict[str, float]:
    """The run's model FLOPs: per image (one forward), training (3x a forward for every image
    of every epoch run), validation (every epoch) and scoring, and their total."""
    per_image = forward_flops(result.model)
    epochs = len(result.history)
    train = 3 * per_image * result.split["train_images"] * epochs
    evaluate = per_image * (result.split["val_images"] * epochs + scored_images)
    return {
        "flops_per_image": per_image,
        "train_flops": train,
        "eval_flops": evaluate,
        "total_flops": train + evaluate,
    }


def _log_artifacts(
    data: StepData,
    cfg: TrainConfig,
    result,
    metrics: dict[str, float],
    evaluations: dict,
    log_figures: bool,
    log_model: bool,
) -> None:
    """The self-describing checkpoint, the history, the preprocessing, figures, the model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = make_checkpoint(
            cfg.model,
            cfg.model_kwargs,
            result.model,
            result.preprocessing,
            cfg.flat(),
            result.best_epoch,
            metrics,
            data.step.name,
        )
        (folder / "checkpoint").mkdir()
        torch.save(checkpoint, folder / "checkpoint" / "model.pt")
        (folder / "history.json").write_text(json.dumps(result.history, indent=1))
        (folder / "preprocessing.json").write_text(
            json.dumps(result.preprocessing.to_dict(), indent=1)
        )
        if evaluations:  # a scored run: what the report, ensembles and champions read back
            written = predictions.write(folder, _predictions(data, result, evaluations))
            predictions.log_digest(written)  # the file is trusted on read only if it matches
        if log_figures:
            figures = folder / "figures"
            figures.mkdir()
            plot_curves(result.history, result.best_epoch, figures / "curves.png")
            for name, evaluation in evaluations.items():
                plot_confusion(evaluation, figures / f"confusion_{name}.png")
                plot_misclassified(
                    evaluation, data.eval_sets[name], figures / f"misclassified_{name}.png"
                )
        mlflow.log_artifacts(tmp)
        if log_model:
            log_pyfunc_model(folder / "checkpoint" / "model.pt")


def _predictions(data: StepData, result, evaluations: dict) -> dict[str, np.ndarray]:
    """Probabilities on every evaluation set, and on a named validation set (SELECT2) with and
    without TTA, keyed by each set's fingerprint."""
    entries = {
        predictions.key(data.eval_sets[name].fingerprint, False): evaluation.probabilities
        for name, evaluation in evaluations.items()
    }
    if data.val_set is not None:
        for tta in (False, True):
            probs = probabilities(result, data.val_set.images, tta).numpy()
            entries[predictions.key(data.val_set.fingerprint, tta)] = probs
    return entries


def log_answer_tta(run_id: str, data: StepData) -> None:
    """A study answer's TTA probabilities on every evaluation set, logged once beside its
    other predictions (`predictions.ANSWER_ARTIFACT`), with their FLOPs (`answer_flops`).
    TTA ensembles of answers are Task 2's champion candidates: the report and `promote`
    measure the chosen one on TEST2 after the choice, and read these instead of predicting
    five views of TEST2 per member again. Only sets not yet in the file are predicted; the
    file keeps every set it held. Probabilities only: no label is read."""
    held = predictions.logged(run_id, predictions.ANSWER_ARTIFACT)
    missing = {
        k: s
        for s in data.eval_sets.values()
        if (k := predictions.key(s.fingerprint, True)) not in held
    }
    if not missing:
        return
    loaded = load_checkpoint(run_id, resolve_device("auto"))  # this machine's best device
    for k, s in missing.items():
        held[k] = probabilities(loaded, s.images, tta=True).numpy()
    per_image = forward_flops(loaded.model)
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = predictions.write(Path(tmp), held, predictions.ANSWER_ARTIFACT)
        client.log_artifact(run_id, str(path))
        predictions.log_digest(path, run_id)
    # every set the file holds: the FLOPs its predictions took
    client.log_metric(
        run_id, "answer_flops", per_image * len(SHIFTS) * sum(map(len, held.values()))
    )


def score_logged_run(run_id: str, data: StepData) -> dict[str, float]:
    """A logged run (a trial) scored on the step's evaluation sets after the fact, for the
    record: its metrics and its predictions (with their digest) logged to the run, once. Used
    for the searched-against-defaults comparison at trial fidelity; chooses nothing."""
    logged = results.run_metrics(run_id)
    if all(f"{name}_acc" in logged for name in data.eval_sets):
        return dict(logged)
    loaded = load_checkpoint(run_id, resolve_device("auto"))
    device = next(loaded.model.parameters()).device
    metrics, entries = {}, {}
    for dataset in data.eval_sets.values():
        evaluation = score_set(loaded.model, loaded.preprocessing, dataset, device)
        metrics.update(evaluation.metrics)
        entries[predictions.key(dataset.fingerprint, False)] = evaluation.probabilities
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = predictions.write(Path(tmp), entries)
        client.log_artifact(run_id, str(path))
        predictions.log_digest(path, run_id)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    return {**logged, **metrics}


LOADER_MODULE = "experiments.serving.pyfunc_model"  # the served model's code, never logged


def log_pyfunc_model(checkpoints: Path | list[Path], tta: bool = False) -> None:
    """Log the run's model for MLflow (UI, registry, serving) as data only.

    The model's folder holds the weights-only checkpoint (an ensemble: one per member, and
    `ensemble.json`); its MLmodel names `LOADER_MODULE`, which MLflow imports from the installed
    package. No code and no pickle is logged, so loading runs only this project's code.
    """
    from mlflow.models import infer_signature

    first = checkpoints if isinstance(checkpoints, Path) else checkpoints[0]
    detector = bool(load_checkpoint(first).checkpoint.get("detector"))
    with warnings.catch_warnings():  # advice on integer columns, at every model
        warnings.simplefilter("ignore", UserWarning)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            if isinstance(checkpoints, Path):
                shutil.copyfile(checkpoints, folder / "checkpoint.pt")
            else:
                for i, path in enumerate(checkpoints):
                    shutil.copyfile(path, folder / f"checkpoint_{i}.pt")
                spec = {"tta": tta, "members": len(checkpoints)}
                (folder / "ensemble.json").write_text(json.dumps(spec))
            example = np.zeros((2, 1, 28, 28), dtype=np.float32)
            output = _output_example(len(example), detector)
            mlflow.pyfunc.log_model(
                name="model",
                loader_module=LOADER_MODULE,
                data_path=str(folder),
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=store.requirements(),
            )


def _output_example(rows: int, detector: bool) -> pd.DataFrame:
    """The served model's output columns and types (`serving.pyfunc_model.classify`), for the
    logged signature."""
    frame = pd.DataFrame({"predicted": np.ones(rows, np.int64)})
    frame["probability"] = np.ones(rows, np.float32)
    for k in range(1, 7):
        frame[f"prob_{k}"] = np.zeros(rows, np.float32)
    if detector:
        frame["detector_score"] = np.zeros(rows, np.float32)
        frame["unknown"] = np.zeros(rows, bool)
    return frame


def _end_with(exc: BaseException) -> None:
    """End the active run with a status and a `state` tag that say what happened."""
    if type(exc).__name__ == "TrialPruned":
        mlflow.set_tag("state", "PRUNED")
        mlflow.end_run("KILLED")
    elif isinstance(exc, KeyboardInterrupt):
        mlflow.set_tag("state", "FAIL")
        mlflow.set_tag("interrupted", "true")
        mlflow.end_run("KILLED")
    else:
        mlflow.set_tag("state", "FAIL")
        reason = "".join(traceback.format_exception_only(exc)).strip()
        mlflow.set_tag("fail_reason", "diverged" if isinstance(exc, Diverged) else reason[:4000])
        if isinstance(exc, Diverged):
            mlflow.set_tag("fail_detail", str(exc))
        mlflow.end_run("FAILED")
