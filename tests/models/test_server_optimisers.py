"""Server-side optimisers (server/strategies.py): defaults sized for DP updates, user options win."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam

from fedrad.common.config import parse_study
from fedrad.server.strategies import DP_DEFAULTS, strategy_class, strategy_kwargs


def _kwargs(name: str, options: dict | None = None) -> dict:
    study = parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 2},
                         "strategy": {"name": name, "options": options or {}}})
    return strategy_kwargs(study, strategy_class(name))


@pytest.mark.parametrize("name", sorted(DP_DEFAULTS))
def test_server_optimisers_get_the_dp_defaults(name: str) -> None:
    kw = _kwargs(name)

    assert all(kw[k] == v for k, v in DP_DEFAULTS[name].items())
    strategy_class(name)(**kw)  # Flower accepts them


def test_user_options_override_the_defaults() -> None:
    kw = _kwargs("fedadam", {"eta": 0.05, "beta_1": 0.5})

    assert kw["eta"] == 0.05 and kw["beta_1"] == 0.5 and kw["tau"] == DP_DEFAULTS["fedadam"]["tau"]


def test_fedavg_gets_no_server_optimiser_options() -> None:
    kw = _kwargs("fedavg")

    assert not {"eta", "tau", "server_momentum"} & set(kw)


def test_fedadam_default_first_step_is_bounded_by_eta() -> None:
    """Adam normalises per coordinate: a round moves each weight by at most about eta (bias-corrected),
    so the default's step stays near a DP round's own move (~0.004 a coordinate in the demo)."""
    kw = _kwargs("fedadam")
    eta, tau = kw["eta"], kw["tau"]
    delta = np.random.default_rng(0).normal(0.0, 0.004, size=1000)  # a DP round's pseudo-gradient
    b1, b2 = FedAdam(**kw).beta_1, FedAdam(**kw).beta_2
    m, v = (1 - b1) * delta, (1 - b2) * delta**2
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at server round 1

    step = eta_norm * m / (np.sqrt(v) + tau)

    assert np.abs(step).max() <= eta
    assert np.abs(step).mean() < 5 * np.abs(delta).mean()
    assert eta < 0.1  # Flower's default (0.1) moves each coordinate ~17x a DP round's move


def test_fedavgm_keeps_flowers_defaults() -> None:
    kw = _kwargs("fedavgm")

    assert "server_momentum" not in kw and "server_learning_rate" not in kw
