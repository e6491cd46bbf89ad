"""New-script detectors on a TRAIN-trained model: a higher score means "new script".

  max_softmax    1 - the model's top softmax probability;
  energy         -logsumexp(logits) (Liu et al., 2020);
  mahalanobis    distance of the penultimate features to the nearest TRAIN class
                 mean under a shared covariance (Lee et al., 2018), fitted on TRAIN.

A shipped detector is a dict (`name`, `threshold`, and for Mahalanobis its
`means` and `precision` tensors) stored in the weights-only checkpoint;
`score_shipped` scores images with it, in the registry model and in `predict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_tools import border_mean
from experiments.training.inference import predict_logits
from models import feature_layer

MODEL_DETECTORS = ("max_softmax", "energy", "mahalanobis")  # declared order: ties keep the first


@torch.no_grad()
def logits_and_features(loaded, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features (the input of the registry's feature layer) for raw images."""
    last = feature_layer(loaded.model)
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach())
    )
    try:
        device = next(loaded.model.parameters()).device
        logits = predict_logits(
            loaded.model, loaded.preprocessing.transform(images).to(device)
        ).cpu()
    finally:
        hook.remove()
    return logits, torch.cat(captured).float().cpu()


@dataclass
class Mahalanobis:
    means: torch.Tensor  # classes x features
    precision: torch.Tensor  # features x features

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> Mahalanobis:
        classes = int(labels.max()) + 1
        means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
        centred = features - means[labels]
        covariance = centred.T @ centred / len(features)
        eye = torch.eye(covariance.shape[0], device=covariance.device, dtype=covariance.dtype)
        precision = torch.linalg.pinv(covariance + 1e-4 * eye.mul(covariance.diagonal().mean()))
        return cls(means, precision)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        diff = features[:, None, :] - self.means[None, :, :]
        distances = torch.einsum("ncf,fg,ncg->nc", diff, self.precision, diff)
        return distances.min(1).values


def detector_scores(
    logits: torch.Tensor, features: torch.Tensor, images: torch.Tensor, maha: Mahalanobis
):
    probabilities = logits.softmax(1)
    return {
        "background": border_mean(images).numpy(),
        "max_softmax": (1 - probabilities.max(1).values).numpy(),
        "energy": (-torch.logsumexp(logits, 1)).numpy(),
        "mahalanobis": maha.score(features).numpy(),
    }


def model_scores(logits: torch.Tensor, features: torch.Tensor, maha: Mahalanobis) -> dict:
    """Each model-based detector's scores (numpy), from one pass of logits and features."""
    probabilities = logits.softmax(1)
    return {
        "max_softmax": (1 - probabilities.max(1).values).numpy(),
        "energy": (-torch.logsumexp(logits, 1)).numpy(),
        "mahalanobis": maha.score(features).numpy(),
    }


def shipped(name: str, threshold: float, maha: Mahalanobis | None = None, **extra) -> dict:
    """The detector dict a checkpoint carries."""
    detector = {"name": name, "threshold": float(threshold), **extra}
    if name == "mahalanobis":
        detector.update(means=maha.means.clone(), precision=maha.precision.clone())
    return detector


def score_shipped(detector: dict, loaded, images: torch.Tensor) -> torch.Tensor:
    """Scores of raw images under a shipped detector (higher: more likely new script)."""
    logits, features = logits_and_features(loaded, images)
    name = detector["name"]
    if name == "max_softmax":
        return 1 - logits.softmax(1).max(1).values
    if name == "energy":
        return -torch.logsumexp(logits, 1)
    if name == "mahalanobis":
        return Mahalanobis(detector["means"], detector["precision"]).score(features)
    raise ValueError(f"unknown detector {name!r}; expected one of {MODEL_DETECTORS}")
