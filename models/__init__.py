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

Adding a model is one file in this folder whose class carries `@register_model("name")`:
every module here is imported when the package is (`_discover`), so the decorator runs and
the model joins `MODELS`, the command line, the Makefile (`python -m models list --names`)
and the report with no other edit. `register_model(name, order=..., cost=...)`: `order`
places its column in tables (lower first; new models after the four of the study), `cost`
ranks its studies' training time so that `make reproduce` starts the slowest first.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from models.registry import MODELS, by_cost, register_model

NOT_MODELS = ("layers", "registry")  # modules of this package that are not models


def _discover() -> None:
    """Import every module of this package, so that each model file registers itself."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in NOT_MODELS:
            importlib.import_module(f"{__name__}.{module.name}")


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


_discover()


__all__ = [
    "MODELS",
    "by_cost",
    "register_model",
    "count_parameters",
    "create_model",
    "feature_layer",
    "hyperparameters",
    "search_space",
    "title",
]
