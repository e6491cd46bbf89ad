"""Checkpoints that describe themselves, and `load_checkpoint` to get the same predictions back.

A checkpoint is a plain dict saved with `torch.save`, loadable with
`weights_only=True` (no pickled code): model name and constructor kwargs, the
resolved preprocessing, the full training config, the best epoch and its
metrics, and the state dict.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from experiments.core.preprocess import Preprocessing
from experiments.tracking import store
from experiments.training.inference import predict_logits
from models import create_model

FORMAT_VERSION = 1
ARTIFACT_PATH = "checkpoint/model.pt"
RUN_ID = re.compile(r"[0-9a-f]{32}")


def save_atomically(obj: Any, path: Path) -> None:
    """`torch.save(obj)` to `path` through a temporary file beside it and a rename, so a
    reader never sees half a file and a failed write leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            torch.save(obj, tmp)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    Path(tmp.name).replace(path)


def make_checkpoint(
    model_name: str,
    model_kwargs: dict[str, Any],
    model: nn.Module,
    preprocessing: Preprocessing,
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    step: str,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "preprocessing": preprocessing.to_dict(),
        "config": dict(config),
        "step": step,
        "epoch": epoch,
        "metrics": dict(metrics),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


@dataclass
class Loaded:
    """A model ready to predict, with the preprocessing it was trained with."""

    model: nn.Module
    preprocessing: Preprocessing
    checkpoint: dict[str, Any]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Labels 0..5 for raw images `N x 1 x 28 x 28` in [0, 1]."""
        device = next(self.model.parameters()).device
        x = self.preprocessing.transform(images).to(device)
        return predict_logits(self.model, x, batch_size).argmax(1).cpu()


def _resolve(source: str | os.PathLike, scratch: str) -> Path:
    """A checkpoint file: the path itself, or the run's artifact downloaded from MLflow into
    `scratch` (a folder the caller removes: a report reloads hundreds of runs)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.suffix or os.sep in str(source) or not RUN_ID.fullmatch(str(source)):
        raise FileNotFoundError(f"{source}: no such checkpoint file (nor an MLflow run id)")
    store.init()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=str(source), artifact_path=ARTIFACT_PATH, dst_path=scratch
            )
        )
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileNotFoundError(f"{source}: no checkpoint in that MLflow run ({first})") from None


def load_checkpoint(source: str | os.PathLike, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild model and preprocessing from a checkpoint file or an MLflow run id.

    Loading is weights-only (no pickled code runs); anything that is not a
    checkpoint of this project is a ValueError naming the source.
    """
    with tempfile.TemporaryDirectory(prefix="glyph-checkpoint-") as scratch:
        path = _resolve(source, scratch)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a non-torch file, a pickle with code, a truncated file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"{type(exc).__name__}: {first}"[:200]
            raise ValueError(f"{source}: not a checkpoint of this project ({reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        version = checkpoint.get("format_version") if isinstance(checkpoint, dict) else None
        raise ValueError(f"{source}: unsupported checkpoint format {version}")
    try:
        model = create_model(checkpoint["model"], **checkpoint["model_kwargs"])
        model.load_state_dict(checkpoint["state_dict"])
        preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{source}: a damaged checkpoint ({first[:200]})") from None
    model.to(device, memory_format=torch.channels_last).eval()  # the layout it was trained in
    return Loaded(model, preprocessing, checkpoint)
