"""Privacy accounting helpers (pure functions over an accountant history).

A *history* is a list of ``(noise_multiplier, sample_rate, num_steps)`` triples, the same form
Opacus' RDP/PRV accountants keep in ``accountant.history``. Everything here takes keyword-only
arguments and fails hard on misuse: a wrong privacy number is worse than a crash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .errors import BudgetExceededError, PrivacyError

HistoryEntry = tuple[float, float, int]
ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _check_entry(sigma: float, q: float, steps: int) -> None:
    if not (isinstance(steps, int) and steps >= 0):
        raise PrivacyError(f"num_steps must be a non-negative int, got {steps!r}")
    if not (0.0 < q <= 1.0):
        raise PrivacyError(f"sample_rate must be in (0, 1], got {q!r}")
    if not (sigma >= 0.0) or math.isnan(sigma):
        raise PrivacyError(f"noise_multiplier must be >= 0, got {sigma!r}")


def make_accountant(*, name: str, history: Sequence[HistoryEntry] = ()) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {name!r} (known: {sorted(ACCOUNTANTS)})")
    acc = ACCOUNTANTS[name]()
    for sigma, q, steps in history:
        _check_entry(float(sigma), float(q), int(steps))
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    return acc


#: Rényi orders: exactly those of Opacus' ``RDPAccountant`` (so values match it to the last digit).
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian step at every order (RDP composes additively over steps)."""
    out = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS))
    out = np.asarray(out, dtype=np.float64)
    out.setflags(write=False)
    return out


def _rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:
        total = total + _rdp_one_step(float(q), float(sigma)) * int(steps)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(eps)


def epsilon_for(*, history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of a history at ``delta`` (0.0 for an empty history, inf with zero noise).

    RDP is computed as Opacus' ``RDPAccountant`` does, with each (sample rate, noise) pair's
    per-step RDP cached: a ledger of hundreds of rounds costs one vector sum, not hundreds of
    series evaluations (calibration bisects over this function).
    """
    if not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r} (known: {sorted(ACCOUNTANTS)})")
    hist = [h for h in history if int(h[2]) > 0]
    for sigma, q, steps in hist:
        _check_entry(float(sigma), float(q), int(steps))
    if not hist:
        return 0.0
    if any(float(s) == 0.0 for s, _, _ in hist):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(hist, delta)
    return float(make_accountant(name=accountant, history=hist).get_epsilon(delta=delta))


def calibrate_noise(
    *,
    prior_history: Sequence[HistoryEntry],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    max_noise_multiplier: float = 50.0,
    tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier such that ``prior_history + steps`` stays within ``target_epsilon``.

    Raises :class:`~fedrad.common.errors.BudgetExceededError` if even ``max_noise_multiplier``
    would not fit (the budget is spent, or nearly so).
    """

    _check_entry(1.0, sample_rate, steps)
    if target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    prior = list(prior_history)

    def eps(sigma: float) -> float:
        return epsilon_for(history=prior + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    if steps == 0:
        return 0.0
    hi = max_noise_multiplier
    if eps(hi) > target_epsilon:
        spent = epsilon_for(history=prior, delta=delta, accountant=accountant)
        raise BudgetExceededError(
            f"budget epsilon={target_epsilon:g} cannot fit {steps} more steps: {spent:.4g} already spent "
            f"and even noise_multiplier={max_noise_multiplier:g} would exceed it"
        )
    lo = 0.0
    while hi - lo > tolerance * max(1.0, lo):
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Batches per epoch as Opacus' Poisson loader makes them (``len(data_loader)``)."""
    if num_examples <= 0 or batch_size <= 0:
        raise PrivacyError(f"num_examples and batch_size must be > 0 (got {num_examples}, {batch_size})")
    return math.ceil(num_examples / batch_size)


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses: ``1 / len(data_loader)``."""
    return 1.0 / steps_per_epoch(num_examples=num_examples, batch_size=batch_size)
