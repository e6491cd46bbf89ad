"""The model registry: one dict from name to constructor, and `create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from models.efficientnet import EfficientNet
from models.hybrid import Hybrid
from models.resnet import ResNet
from models.vgg import VGG

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg": VGG,
    "resnet": ResNet,
    "efficientnet": EfficientNet,
    "hybrid": Hybrid,
}
FIXED_ARGS = ("num_classes", "in_channels")  # set by the data, not searched


def hyperparameters(name: str) -> dict[str, object]:
    """The tunable constructor arguments of model `name` with their defaults."""
    constructor = _constructor(name)
    return {
        key: param.default
        for key, param in inspect.signature(constructor).parameters.items()
        if key not in FIXED_ARGS
    }


def _constructor(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name: str, num_classes: int = 6, in_channels: int = 1, **hparams) -> nn.Module:
    """Build model `name`; unknown hyperparameters are errors, not silently ignored."""
    known = hyperparameters(name)
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for model {name!r}; "
            f"expected: {', '.join(known)}"
        )
    return _constructor(name)(num_classes=num_classes, in_channels=in_channels, **hparams)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "count_parameters", "create_model", "hyperparameters"]
