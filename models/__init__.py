"""The model registry: one dict from name to constructor, and `create_model`.

The contract every registered model keeps (checked for each by the tests):

- constructor `Model(num_classes=6, in_channels=1, **knobs)`: every other
  argument has a default and is a tunable knob;
- `model.head` is an `nn.Sequential` whose last module is the `nn.Linear` that
  produces the logits, and `forward` ends in it. Transfer freezes "the body" as
  every parameter outside `head`; the shift tools take the input of that last
  linear layer as the model's penultimate features (`feature_layer`);
- optional class attributes: `TITLE` (the report's column title) and
  `SEARCH_SPACE`, the knobs a search varies, as
  `{knob: ("categorical", choices) | ("int", low, high) | ("float", low, high)}`.
  A model without one is searched on the training settings only;
  `CPU_BF16` (default True): False where bf16 autocast trains this model more
  slowly than fp32 on CPU, so `precision=auto` keeps it in fp32 there.

Adding a model is its own file and one line in `MODELS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

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
SPACE_KINDS = ("categorical", "int", "float")


def hyperparameters(name: str) -> dict[str, object]:
    """The tunable constructor arguments of model `name` with their defaults."""
    constructor = _constructor(name)
    return {
        key: param.default
        for key, param in inspect.signature(constructor).parameters.items()
        if key not in FIXED_ARGS
    }


def search_space(name: str) -> dict[str, tuple[Any, ...]]:
    """The knobs a search varies for model `name` (declared beside the model; may be empty)."""
    space = dict(getattr(_constructor(name), "SEARCH_SPACE", {}))
    knobs = hyperparameters(name)
    for knob, spec in space.items():
        if knob not in knobs:
            raise ValueError(f"model {name!r}: SEARCH_SPACE names {knob!r}, not a constructor knob")
        if not spec or spec[0] not in SPACE_KINDS:
            raise ValueError(
                f"model {name!r}: SEARCH_SPACE[{knob!r}] must start with {SPACE_KINDS}"
            )
    return space


def title(name: str) -> str:
    """The model's display name (its `TITLE`, else its registry name)."""
    return getattr(_constructor(name), "TITLE", name)


def cpu_bf16(name: str) -> bool:
    """Whether bf16 autocast speeds model `name` up on a CPU that has bf16 (its `CPU_BF16`)."""
    return bool(getattr(_constructor(name), "CPU_BF16", True))


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


def feature_layer(model: nn.Module) -> nn.Linear:
    """The linear layer that produces the logits; its input is the penultimate feature vector."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Sequential) or not isinstance(head[-1], nn.Linear):
        raise TypeError(
            f"{type(model).__name__} breaks the registry contract: `head` must be an "
            "nn.Sequential ending in the nn.Linear that produces the logits"
        )
    return head[-1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "count_parameters",
    "create_model",
    "feature_layer",
    "hyperparameters",
    "search_space",
    "title",
]
