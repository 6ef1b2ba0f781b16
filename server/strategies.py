"""Aggregation strategies: a registry over Flower's message-API strategies."""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.serverapp.strategy.strategy import Strategy

from fedrad.common.config import StudyConfig
from fedrad.common.errors import StrategyError

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

#: Server-optimiser defaults for DP updates, applied where ``strategy.options`` leaves a field unset (issue 10).
#: Flower's own defaults suit non-private updates: FedAdam/FedAdagrad ``eta=0.1`` with ``tau=1e-3`` moves every
#: coordinate by about ``eta`` per round (Adam normalises each coordinate's pseudo-gradient), while a DP-SGD
#: round of the demo moves a coordinate by about 0.004 and that move is mostly noise. (FedAvgM keeps Flower's
#: defaults, ``server_momentum=0``, i.e. plain FedAvg, until a momentum is measured.) Measured rows:
#: benchmarks/ISSUE10.md (FedAdam eta 0.01 still trailed FedAvg there; FedAvg stays the default strategy).
DP_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.01, "tau": 1e-3},
    "fedyogi": {"eta": 0.01, "tau": 1e-3},
    "fedadagrad": {"eta": 0.01, "tau": 1e-3},
}

#: Set by fedrad from the study's federation section; not accepted in ``strategy.options``.
_MANAGED = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
            "proximal_mu"}


def strategy_kwargs(study: StudyConfig, cls: type[Strategy]) -> dict[str, Any]:
    fed = study.federation
    params = inspect.signature(cls.__init__).parameters
    options = dict(study.strategy.options)
    clash = sorted(set(options) & _MANAGED)
    if clash:
        raise StrategyError(f"strategy.options: {clash} are set from the federation/training sections")
    unknown = sorted(set(options) - set(params))
    if unknown:
        allowed = sorted(p for p in params if p not in _MANAGED | {"self", "args", "kwargs"})
        raise StrategyError(f"strategy {study.strategy.name!r}: unknown option(s) {unknown} (allowed: {allowed})")
    kwargs: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": fed.min_hospitals,
        "min_evaluate_nodes": fed.min_hospitals if fed.fraction_evaluate > 0 else 0,
        "min_available_nodes": fed.min_hospitals,
        **DP_DEFAULTS.get(study.strategy.name, {}),
        **options,
    }
    if "proximal_mu" in params:
        if study.training.proximal_mu <= 0:
            raise StrategyError("strategy 'fedprox' needs training.proximal_mu > 0")
        kwargs["proximal_mu"] = study.training.proximal_mu
    return {k: v for k, v in kwargs.items() if k in params}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name]
