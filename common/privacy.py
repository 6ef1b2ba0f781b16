"""Privacy accounting helpers (pure functions over an accountant history).

A *history* is a list of ``(noise_multiplier, sample_rate, num_steps)`` triples, the same form
Opacus' RDP/PRV accountants keep in ``accountant.history``. Everything here takes keyword-only
arguments and fails hard on misuse: a wrong privacy number is worse than a crash.

RDP accounting is Opacus' ``RDPAccountant`` (same orders, same series, same truncation, same
RDP-to-(epsilon, delta) conversion), evaluated with numpy over many orders and ledger entries at
once instead of one order and one series term at a time: values agree with Opacus to about 1e-12
per step (rounding only; tests/test_privacy_calibration.py checks a grid), and the ledger,
the planner and the noise calibration all use this one implementation, so a calibrated noise
multiplier is always within budget by the very numbers the ledger checks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from .errors import BudgetExceededError, PrivacyError
from .rdp import (
    _FLOOR,
    _FRAC_IDX,
    _INT_IDX,
    _IS_INT,
    _ORDERS,
    _RDP_CACHE,
    _SKIP_SLACK,
    _conversion,
    _frac_lower_bounds,
    _rdp_epsilon,
    _total_rdp,
)

log = logging.getLogger(__name__)

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



def epsilon_for(*, history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of a history at ``delta`` (0.0 for an empty history, inf with zero noise).

    RDP is computed as Opacus' ``RDPAccountant`` does, with each (sample rate, noise) pair's
    per-step RDP cached order by order: a ledger of hundreds of rounds costs one vector sum, not
    hundreds of series evaluations. Only the orders that can be the minimum are evaluated
    (:func:`_rdp_epsilon`); the value is the minimum over all of them.
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
        return _rdp_epsilon(hist, float(delta))
    return float(make_accountant(name=accountant, history=hist).get_epsilon(delta=delta))


# ------------------------------------------------------------------ noise calibration
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

    A bisection on [0, ``max_noise_multiplier``] down to a relative width of ``tolerance``; the
    upper end is returned, so ``epsilon_for`` of the result is always <= ``target_epsilon``.
    Raises :class:`~fedrad.common.errors.BudgetExceededError` if even ``max_noise_multiplier``
    would not fit (the budget is spent, or nearly so).
    """

    _check_entry(1.0, sample_rate, steps)
    if target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if steps == 0:
        return 0.0
    prior = [(float(s), float(q), int(n)) for s, q, n in prior_history]
    args = (float(sample_rate), int(steps), float(target_epsilon), float(delta), accountant,
            float(max_noise_multiplier), float(tolerance))
    key = hashlib.sha256(repr((prior, args)).encode()).digest()  # repr of a float round-trips exactly
    sigma = _CALIBRATIONS.get(key)
    if sigma is None:
        sigma = _calibrate(prior, *args)  # a refusal raises and is not remembered
        _CALIBRATIONS.put(key, sigma)
    return sigma


class _Memo:
    """A small thread-safe LRU map from a calibration's digest (the whole ledger and plan, SHA-256)
    to its result: a simulation plans the same (ledger, plan) for many sites and rounds, and the
    digest keeps a long ledger from being held once per remembered plan."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> float | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: float) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CALIBRATIONS = _Memo(maxsize=1024)


def _calibrate(prior: list[HistoryEntry], sample_rate: float, steps: int, target: float, delta: float,
               accountant: str, max_noise_multiplier: float, tolerance: float) -> float:
    if accountant == "rdp" and 0.0 < max_noise_multiplier < math.inf and 0.0 < delta < 1.0:
        for sigma, q, n in prior:
            if n > 0:  # as epsilon_for checks them
                _check_entry(sigma, q, n)
        return _calibrate_rdp(prior, sample_rate, steps, target, delta, max_noise_multiplier, tolerance)
    return _calibrate_bisect(prior, sample_rate, steps, target, delta, accountant, max_noise_multiplier, tolerance)


def _budget_exceeded(prior: list[HistoryEntry], steps: int, target: float, delta: float, accountant: str,
                     max_noise_multiplier: float) -> BudgetExceededError:
    spent = epsilon_for(history=prior, delta=delta, accountant=accountant)
    return BudgetExceededError(
        f"budget epsilon={target:g} cannot fit {steps} more steps: {spent:.4g} already spent "
        f"and even noise_multiplier={max_noise_multiplier:g} would exceed it"
    )


def _calibrate_bisect(prior: list[HistoryEntry], sample_rate: float, steps: int, target: float, delta: float,
                      accountant: str, max_noise_multiplier: float, tolerance: float) -> float:
    """The plain bisection over :func:`epsilon_for` (any accountant; PRV pays a full accountant
    evaluation per probe, about 20 of them)."""

    def eps(sigma: float) -> float:
        return epsilon_for(history=prior + [(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    hi = max_noise_multiplier
    if eps(hi) > target:
        raise _budget_exceeded(prior, steps, target, delta, accountant, max_noise_multiplier)
    lo = 0.0
    while hi - lo > tolerance * max(1.0, lo):
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _calibrate_rdp(prior: list[HistoryEntry], sample_rate: float, steps: int, target: float, delta: float,
                   max_noise_multiplier: float, tolerance: float) -> float:
    """The bisection of :func:`_calibrate_bisect`, probe for probe, with the same decisions, but
    each probe evaluates only the orders that can still decide it.

    epsilon(sigma) <= target iff some order alpha has eps_alpha(sigma) <= target, and every
    eps_alpha falls as sigma grows. An order is *dropped* for good when (a) even with no new RDP
    it is over the target (the conversion alone, or with the prior's RDP), or (b) it was over the
    target at an accepted probe: every later probe is at a smaller sigma, where it is larger
    still. At each probe the integer orders still live are evaluated (cheap); a fractional order
    is evaluated only when no integer order accepts the probe and its lower bound from the
    integer order below it (:func:`_frac_lower_bounds`) does not rule it out. A probe is
    accepted only on a computed eps_alpha <= target, so the result is within budget by the same
    numbers :func:`epsilon_for` computes (checked before it is returned, with the plain bisection
    as the fallback should the check ever fail); the bounds can only
    make a probe be rejected that the full minimum would accept, i.e. a larger, never a smaller
    noise multiplier, and with their rounding slack they do not.
    """
    if any(s == 0.0 for s, _, n in prior if n > 0):
        raise _budget_exceeded(prior, steps, target, delta, "rdp", max_noise_multiplier)
    hist = [h for h in prior if h[2] > 0]
    shift, gain = _conversion(delta)
    limit = target + _SKIP_SLACK
    prior_total = np.full(len(_ORDERS), np.nan)
    prior_total[_INT_IDX] = _total_rdp(hist, _INT_IDX)
    live_int = _INT_IDX[(prior_total[_INT_IDX] - shift[_INT_IDX]) + gain[_INT_IDX] <= limit]
    live_frac = _FRAC_IDX[_frac_lower_bounds(prior_total, _FRAC_IDX, shift, gain) <= limit]
    # the prior's RDP at a fractional order is summed only when a probe first needs that order
    summed = _IS_INT.copy()

    def eps_at(sigma: float, orders: np.ndarray, total: np.ndarray) -> np.ndarray:
        """eps_alpha at ``orders`` with the probe's steps added; fills ``total`` there."""
        new = _RDP_CACHE.rows([(sample_rate, sigma)], orders)[0]
        total[orders] = prior_total[orders] + new * steps
        return (total[orders] - shift[orders]) + gain[orders]

    def probe(sigma: float) -> bool:
        nonlocal live_int, live_frac
        total = np.full(len(_ORDERS), np.nan)
        floors = _FLOOR[live_frac]
        eps_at(sigma, np.union1d(live_int, floors[floors >= 0]), total)
        ok_int = (total[live_int] - shift[live_int]) + gain[live_int] <= target
        maybe = live_frac[_frac_lower_bounds(total, live_frac, shift, gain) <= limit]
        if ok_int.any():
            live_int, live_frac = live_int[ok_int], maybe
            return True
        todo = maybe[~summed[maybe]]
        if todo.size:
            prior_total[todo] = _total_rdp(hist, todo)
            summed[todo] = True
        ok_frac = eps_at(sigma, maybe, total) <= target if maybe.size else np.zeros(0, dtype=bool)
        if ok_frac.any():
            live_int, live_frac = live_int[ok_int], maybe[ok_frac]
            return True
        return False

    hi = max_noise_multiplier
    if not probe(hi):
        raise _budget_exceeded(prior, steps, target, delta, "rdp", max_noise_multiplier)
    lo = 0.0
    while hi - lo > tolerance * max(1.0, lo):
        mid = (lo + hi) / 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = epsilon_for(history=hist + [(hi, sample_rate, steps)], delta=delta)
    if not final <= target:  # not expected: an accepted probe's order is one epsilon_for minimises over
        log.warning("fast noise calibration gave epsilon %r > target %r; using the plain bisection", final, target)
        return _calibrate_bisect(hist, sample_rate, steps, target, delta, "rdp", max_noise_multiplier, tolerance)
    return hi


def steps_per_epoch(*, num_examples: int, batch_size: int) -> int:
    """Batches per epoch as Opacus' Poisson loader makes them (``len(data_loader)``)."""
    if num_examples <= 0 or batch_size <= 0:
        raise PrivacyError(f"num_examples and batch_size must be > 0 (got {num_examples}, {batch_size})")
    return math.ceil(num_examples / batch_size)


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses: ``1 / len(data_loader)``."""
    return 1.0 / steps_per_epoch(num_examples=num_examples, batch_size=batch_size)
