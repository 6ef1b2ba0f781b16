"""The model registry: names to factories. Every registered model is accepted by Opacus (GroupNorm, never
BatchNorm). The models register themselves when :mod:`fedrad.common.models` is imported."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ModelError

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory ``f(*, in_channels, num_classes, image_size, **options) -> nn.Module``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = factory
        return factory

    return deco


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Instantiate a registered model; unknown names or options raise :class:`ModelError`."""
    options = dict(options or {})
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    factory = MODELS[name]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params) - {"in_channels", "num_classes", "image_size"})
    if unknown:
        allowed = sorted(p for p in params if p not in {"in_channels", "num_classes", "image_size"})
        raise ModelError(f"model {name!r}: unknown option(s) {unknown} (allowed: {allowed})")
    try:
        return factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {name!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
