"""Models: the registry (:mod:`.registry`) and the registered architectures."""

from __future__ import annotations

from . import cnn as _cnn  # noqa: F401  (registers "cnn")
from . import resnet as _resnet  # noqa: F401  (registers the ResNets)
from . import scatter as _scatter  # noqa: F401  (registers "scatter-cnn", "scatter-linear")
from .registry import MODELS, ModelFactory, build_model, count_parameters, register_model

__all__ = ["MODELS", "ModelFactory", "build_model", "count_parameters", "register_model"]
