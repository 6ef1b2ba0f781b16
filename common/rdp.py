"""Rényi DP of the subsampled Gaussian mechanism, vectorised: Opacus' ``RDPAccountant`` arithmetic
(same orders, same integer-order binomial sum, same fractional-order series and truncation, same
RDP-to-(epsilon, delta) conversion) evaluated with numpy over many orders and ledger entries at
once, with each (sample rate, noise) pair's per-step RDP cached order by order. Values agree with
Opacus to about 1e-12 per step (rounding only; tests/test_privacy_calibration.py checks a grid).

:mod:`fedrad.common.privacy` builds the ledger's epsilon and the noise calibration on it.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from scipy import special

from .errors import PrivacyError

HistoryEntry = tuple[float, float, int]

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

