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
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from scipy import special

from .errors import BudgetExceededError, PrivacyError

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


# ------------------------------------------------------------------ RDP of the subsampled Gaussian
#: Rényi orders: exactly those of Opacus' ``RDPAccountant``.
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
_ORDERS = np.asarray(RDP_ORDERS, dtype=np.float64)
_IS_INT = np.array([float(a).is_integer() for a in RDP_ORDERS])
_INT_IDX = np.flatnonzero(_IS_INT)
_FRAC_IDX = np.flatnonzero(~_IS_INT)
#: For each fractional order alpha >= 2, the index of the integer order floor(alpha) (else -1).
#: RDP is a Rényi divergence, non-decreasing in the order, so the cheap integer order's RDP is a
#: lower bound for the fractional orders above it: a fractional order (a series of dozens to
#: thousands of terms) is evaluated only when that bound does not already rule it out.
_FLOOR = np.array([int(np.flatnonzero(_ORDERS == math.floor(a))[0]) if a >= 2 and not float(a).is_integer() else -1
                   for a in RDP_ORDERS])
_INT_I = np.arange(int(_ORDERS.max()) + 1, dtype=np.float64)
with np.errstate(divide="ignore"):
    #: log C(alpha, i) of every integer order (row: index into RDP_ORDERS), -inf past i = alpha.
    _INT_LOG_BINOM = np.where(
        (_INT_I[None, :] <= _ORDERS[:, None]) & _IS_INT[:, None],
        np.log(np.abs(special.binom(_ORDERS[:, None], _INT_I[None, :]))),
        -np.inf,
    )
#: Opacus stops a fractional order's series at the first term below exp(-30).
_SERIES_CUTOFF = -30.0


def _log_a_int(q: np.ndarray, sigma: np.ndarray, order: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders (Opacus ``_compute_log_a_for_int_alpha``), one per row."""
    i = _INT_I[None, :]
    alpha = _ORDERS[order][:, None]
    s = (_INT_LOG_BINOM[order] + i * np.log(q)[:, None] + (alpha - i) * np.log(1 - q)[:, None]
         + (i * i - i) / (2 * sigma**2)[:, None])
    m = s.max(axis=1)
    return np.log(np.exp(s - m[:, None]).sum(axis=1)) + m


_CHUNK0, _CHUNK_MAX = 64, 4096
_series_chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
_series_lock = threading.Lock()


def _series_chunk(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Term indices i of the c-th chunk of the fractional-order series, with log|C(alpha, i)| and
    the sign of C(alpha, i) for every order (rows: indices into RDP_ORDERS): they depend on
    neither the sample rate nor the noise, so they are computed once per process."""
    with _series_lock:
        while len(_series_chunks) <= c:
            k = len(_series_chunks)
            start = sum(min(_CHUNK0 << m, _CHUNK_MAX) for m in range(k))
            i = np.arange(start, start + min(_CHUNK0 << k, _CHUNK_MAX), dtype=np.float64)[None, :]
            with np.errstate(divide="ignore"):
                coef = special.binom(_ORDERS[:, None], i)
                _series_chunks.append((i, np.log(np.abs(coef)), coef > 0))
        return _series_chunks[c]


def _log_a_frac(q: np.ndarray, sigma: np.ndarray, order: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional orders (Opacus ``_compute_log_a_for_frac_alpha``), one per row.

    The same series with the same stopping rule (every term up to and including the first whose
    two parts are both below exp(-30)), summed chunk by chunk over the rows still running.
    """
    n = len(order)
    alpha_all = _ORDERS[order]
    lq_all, l1q_all = np.log(q), np.log(1 - q)
    z0_all = sigma**2 * np.log(1 / q - 1) + 0.5
    r_all = math.sqrt(2) * sigma
    two_s2_all = 2 * sigma**2
    peak = np.full((2, n), -np.inf)
    acc = np.zeros((2, n))
    rows = np.arange(n)
    c = 0
    while rows.size:
        i, log_coef_all, positive_all = _series_chunk(c)
        log_coef, positive = log_coef_all[order[rows]], positive_all[order[rows]]
        alpha = alpha_all[rows][:, None]
        lq, l1q = lq_all[rows][:, None], l1q_all[rows][:, None]
        z0, r, two_s2 = z0_all[rows][:, None], r_all[rows][:, None], two_s2_all[rows][:, None]
        j = alpha - i
        log_s0 = (log_coef + i * lq + j * l1q) + (i * i - i) / two_s2 + (
            math.log(0.5) + (math.log(2) + special.log_ndtr(-((i - z0) / r) * 2**0.5)))
        log_s1 = (log_coef + j * lq + i * l1q) + (j * j - j) / two_s2 + (
            math.log(0.5) + (math.log(2) + special.log_ndtr(-((z0 - j) / r) * 2**0.5)))
        stop = np.maximum(log_s0, log_s1) < _SERIES_CUTOFF
        done = stop.any(axis=1)
        width = i.shape[1]
        last = np.where(done, stop.argmax(axis=1), width - 1)
        keep = np.arange(width)[None, :] <= last[:, None]
        for part, log_s in enumerate((log_s0, log_s1)):
            log_s = np.where(keep, log_s, -np.inf)
            new_peak = np.maximum(peak[part, rows], log_s.max(axis=1))
            w = np.exp(log_s - new_peak[:, None])
            acc[part, rows] = acc[part, rows] * np.exp(peak[part, rows] - new_peak) + np.where(positive, w, -w).sum(axis=1)
            peak[part, rows] = new_peak
        rows = rows[~done]
        c += 1
    if not (acc > 0).all():  # Opacus would raise here too (log of a negative partial sum)
        raise PrivacyError("RDP series did not converge to a positive sum")
    return np.logaddexp(np.log(acc[0]) + peak[0], np.log(acc[1]) + peak[1])


def _rdp_cells(q: np.ndarray, sigma: np.ndarray, order: np.ndarray) -> np.ndarray:
    """RDP of one subsampled-Gaussian step, one (sample rate, noise > 0, order index) per row."""
    out = np.empty(len(order))
    full = q == 1.0
    out[full] = _ORDERS[order[full]] / (2 * sigma[full] ** 2)
    for mask, log_a in ((~full & _IS_INT[order], _log_a_int), (~full & ~_IS_INT[order], _log_a_frac)):
        if mask.any():
            out[mask] = log_a(q[mask], sigma[mask], order[mask]) / (_ORDERS[order[mask]] - 1)
    return out


class _RdpCache:
    """Per-step RDP of each (sample rate, noise multiplier) pair, filled lazily order by order
    (RDP composes additively over steps, so a ledger costs one vector sum per entry)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._rows: OrderedDict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

    def rows(self, pairs: Sequence[tuple[float, float]], orders: np.ndarray) -> np.ndarray:
        """``(len(pairs), len(orders))`` per-step RDP; ``orders`` are indices into RDP_ORDERS.
        A pair that occurs many times (a ledger's rounds at one noise) is computed once."""
        if not pairs:
            return np.zeros((0, len(orders)))
        distinct = list(dict.fromkeys(pairs))
        with self._lock:
            got = {}
            for pair in distinct:
                row = self._rows.get(pair)
                if row is None:
                    row = (np.zeros(len(_ORDERS)), np.zeros(len(_ORDERS), dtype=bool))
                    self._rows[pair] = row
                else:
                    self._rows.move_to_end(pair)
                got[pair] = row
            while len(self._rows) > self._maxsize:
                self._rows.popitem(last=False)
        which, col = np.nonzero(~np.stack([got[pair][1][orders] for pair in distinct]))
        if which.size:
            pairs_arr = np.asarray(distinct, dtype=np.float64)
            values = _rdp_cells(pairs_arr[which, 0], pairs_arr[which, 1], orders[col])
            for k in np.unique(which):
                sel = which == k
                row_values, known = got[distinct[k]]
                row_values[orders[col[sel]]] = values[sel]
                known[orders[col[sel]]] = True
        return np.stack([got[pair][0][orders] for pair in pairs])


_RDP_CACHE = _RdpCache(maxsize=4096)
#: Slack for rounding when an order is skipped because it cannot win: a computed per-step RDP can
#: be a rounding error below 0 (log of a sum that is 1 + tiny), never more than ~1e-15 below.
_SKIP_SLACK = 1e-6


def _below(total: np.ndarray) -> np.ndarray:
    """A lower bound of the fractional orders' RDP above these integer orders' summed RDP, with
    room for rounding (both are computed, not exact)."""
    return total - 1e-9 * (1.0 + np.abs(total))


def _frac_lower_bounds(total_by_order: np.ndarray, frac: np.ndarray, shift: np.ndarray,
                       gain: np.ndarray) -> np.ndarray:
    """Lower bounds of eps_alpha at the fractional order indices ``frac``, from the summed RDP at
    their integer floors (``total_by_order`` must hold those) or from RDP >= 0 below order 2."""
    floor = _FLOOR[frac]
    rdp = np.where(floor >= 0, _below(total_by_order[np.maximum(floor, 0)]), 0.0)
    return (rdp - shift[frac]) + gain[frac]


@lru_cache(maxsize=64)
def _conversion(delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The two order-dependent terms of Opacus' ``get_privacy_spent`` at ``delta``:
    epsilon(alpha) = (rdp - shift) + gain."""
    shift = (np.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1)
    gain = np.log((_ORDERS - 1) / _ORDERS)
    shift.setflags(write=False)
    gain.setflags(write=False)
    return shift, gain


def _total_rdp(hist: Sequence[HistoryEntry], orders: np.ndarray) -> np.ndarray:
    """Summed RDP of a history (positive noise everywhere) at the given order indices."""
    per_step = _RDP_CACHE.rows([(float(q), float(s)) for s, q, _ in hist], orders)
    total = np.zeros(len(orders))
    for row, (_, _, steps) in zip(per_step, hist):
        total = total + row * int(steps)
    return total


def _rdp_epsilon(hist: Sequence[HistoryEntry], delta: float) -> float:
    """min over orders of Opacus' RDP-to-DP conversion. Every integer order is evaluated (cheap);
    a fractional order only if its lower bound (:func:`_frac_lower_bounds`) could beat the best
    integer order: the others cannot be the minimum."""
    shift, gain = _conversion(delta)
    total = np.full(len(_ORDERS), np.nan)
    eps = np.full(len(_ORDERS), np.inf)
    total[_INT_IDX] = _total_rdp(hist, _INT_IDX)
    eps[_INT_IDX] = (total[_INT_IDX] - shift[_INT_IDX]) + gain[_INT_IDX]
    best = np.inf if np.isnan(eps[_INT_IDX]).all() else np.nanmin(eps[_INT_IDX])
    rest = _FRAC_IDX[~(_frac_lower_bounds(total, _FRAC_IDX, shift, gain) >= best + _SKIP_SLACK)]
    if rest.size:
        eps[rest] = (_total_rdp(hist, rest) - shift[rest]) + gain[rest]
    if np.isnan(eps).all():  # no privacy, as Opacus' get_privacy_spent says
        return math.inf
    opt = int(np.nanargmin(eps))
    if opt in (0, len(eps) - 1):  # as Opacus' get_privacy_spent warns
        extreme = "smallest" if opt == 0 else "largest"
        warnings.warn(f"Optimal order is the {extreme} alpha. Please consider expanding the range of alphas "
                      "to get a tighter privacy bound.", stacklevel=3)
    return float(eps[opt])


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
