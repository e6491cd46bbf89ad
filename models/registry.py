"""The registry itself: `@register_model` fills `MODELS` (models/__init__.py discovers the files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}  # filled by @register_model, in `order`
_RANKS: dict[str, tuple[float, float]] = {}  # name -> (order, cost)
ModelClass = TypeVar("ModelClass", bound=Callable[..., nn.Module])


def register_model(
    name: str, order: float = 100.0, cost: float = 1.0
) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: register a model under `name` (a second model of that name is an error)."""

    def register(constructor: ModelClass) -> ModelClass:
        known = MODELS.get(name)
        if known is not None and known.__qualname__ != constructor.__qualname__:
            raise ValueError(f"model name {name!r} is registered twice: {known} and {constructor}")
        MODELS[name] = constructor
        _RANKS[name] = (order, cost)
        ordered = sorted(MODELS, key=lambda key: (_RANKS.get(key, (100.0, 1.0))[0], key))
        for key in ordered:  # keep MODELS itself in table order
            MODELS[key] = MODELS.pop(key)
        return constructor

    return register


def by_cost() -> list[str]:
    """Registered models, the most expensive to study first (`make reproduce`'s order)."""
    return sorted(MODELS, key=lambda key: (-_RANKS.get(key, (0, 1.0))[1], key))
