"""Fast RDP accounting and noise calibration (fedrad.common.privacy) against the slow originals.

The references live here only: Opacus' ``compute_rdp`` / ``get_privacy_spent`` one order and one
series term at a time, and the plain bisection the library used before it evaluated many orders at
once and skipped the orders that cannot decide a probe. The fast path must agree with them, never
return a noise multiplier over budget, and refuse a spent budget with the same error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedrad.common import privacy, rdp
from fedrad.common.errors import BudgetExceededError, PrivacyError
from fedrad.common.privacy import calibrate_noise, epsilon_for
from fedrad.common.rdp import RDP_ORDERS

DELTA = 1e-5
ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)


# ------------------------------------------------------------------ slow references
@cache
def _reference_rdp(q: float, sigma: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS), dtype=np.float64)


def _reference_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    hist = [h for h in history if h[2] > 0]
    if not hist:
        return 0.0
    total = np.zeros(len(ORDERS))
    for sigma, q, steps in hist:
        total = total + _reference_rdp(float(q), float(sigma)) * int(steps)
    eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


def _reference_calibrate(*, prior: list[tuple[float, float, int]], q: float, steps: int, target: float,
                         delta: float = DELTA, hi: float = 50.0, tolerance: float = 1e-3) -> float:
    """The bisection exactly as fedrad had it, over the Opacus reference epsilon."""

    def eps(sigma: float) -> float:
        return _reference_epsilon(prior + [(sigma, q, steps)], delta)

    if eps(hi) > target:
        spent = _reference_epsilon(prior, delta)
        raise BudgetExceededError(
            f"budget epsilon={target:g} cannot fit {steps} more steps: {spent:.4g} already spent "
            f"and even noise_multiplier={hi:g} would exceed it"
        )
    lo = 0.0
    while hi - lo > tolerance * max(1.0, lo):
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _ledger(q: float, steps: int, n: int, sigma: float, seed: int) -> list[tuple[float, float, int]]:
    """A size release, then ``n`` rounds at (jittered) ``sigma``: few distinct noise values."""
    rng = random.Random(seed)
    jitter = [sigma * (1 + rng.choice([0.0, 0.01, 0.02])) for _ in range(n)]
    return [(8.0, 1.0, 1)] + [(s, q, steps) for s in jitter]


@pytest.fixture(autouse=True)
def _empty_caches() -> None:
    rdp._RDP_CACHE.clear()
    privacy._CALIBRATIONS.clear()


# ------------------------------------------------------------------ per-step RDP
@pytest.mark.parametrize("q", [1e-3, 0.01, 0.05, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.5, 6.0, 50.0])
def test_per_step_rdp_matches_opacus_at_every_order(q: float, sigma: float) -> None:
    expected = _reference_rdp(q, sigma)

    got = rdp._RDP_CACHE.rows([(q, sigma)], np.arange(len(RDP_ORDERS)))[0]

    # rounding only: Opacus adds thousands of series terms one by one, we sum them in numpy
    assert np.all(np.abs(got - expected) <= 1e-12 + 1e-10 * np.abs(expected))


@pytest.mark.parametrize("q", [1e-3, 0.05, 0.3, 0.9])
@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.0, 20.0])
def test_per_step_rdp_never_falls_with_the_order(q: float, sigma: float) -> None:
    # RDP is a Rényi divergence, non-decreasing in the order: the fast path relies on it to skip
    # fractional orders whose integer floor already rules them out (within its rounding slack)
    per_step = rdp._RDP_CACHE.rows([(q, sigma)], np.arange(len(RDP_ORDERS)))[0]
    order = np.argsort(RDP_ORDERS)

    assert np.all(np.diff(per_step[order]) >= -1e-12 * (1 + np.abs(per_step[order][1:])))


def test_per_step_rdp_does_not_depend_on_what_else_is_computed_with_it() -> None:
    pairs = [(0.05, 0.9), (0.1, 1.3), (1.0, 8.0)]
    alone = [rdp._RDP_CACHE.rows([p], np.arange(len(RDP_ORDERS)))[0] for p in pairs]
    rdp._RDP_CACHE.clear()

    together = rdp._RDP_CACHE.rows(pairs, np.arange(len(RDP_ORDERS)))

    assert all(np.array_equal(a, t) for a, t in zip(alone, together))


def test_epsilon_matches_opacus_accountant_on_mixed_histories() -> None:
    rng = random.Random(3)
    for _ in range(6):
        history = [(8.0, 1.0, 1)] + [(rng.uniform(0.5, 3.0), rng.choice([0.01, 0.05, 0.2]), rng.randint(1, 200))
                                     for _ in range(rng.randint(1, 6))]
        acc = RDPAccountant()
        acc.history = list(history)

        assert epsilon_for(history=history, delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_epsilon_skips_only_orders_that_cannot_be_the_minimum(seed: int) -> None:
    rng = random.Random(seed)
    history = [(8.0, 1.0, 1)] + [(rng.uniform(0.3, 5.0), rng.choice([0.005, 0.05, 0.3, 1.0]), rng.randint(1, 500))
                                 for _ in range(rng.randint(1, 4))]
    delta = rng.choice([1e-3, 1e-5, 1e-8])

    eps = epsilon_for(history=history, delta=delta)

    every_order = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:  # the same cells, every order, summed as Opacus does
        every_order = every_order + rdp._RDP_CACHE.rows([(q, sigma)], np.arange(len(RDP_ORDERS)))[0] * steps
    expected, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=every_order, delta=delta)
    assert eps == float(expected)


def test_epsilon_finds_an_optimum_at_a_small_order() -> None:
    # a huge epsilon is optimal at an order below 2, which the fast path evaluates only on demand
    history = [(0.3, 0.3, 200)]
    assert epsilon_for(history=history, delta=DELTA) == pytest.approx(_reference_epsilon(history, DELTA), rel=1e-9)


# ------------------------------------------------------------------ calibration
CASES = [  # (q, steps, prior entries, target); the slow ones cost the reference seconds each
    (0.01, 500, 0, 8.0),
    (0.05, 100, 0, 1.0),
    pytest.param(0.3, 10, 0, 4.0, marks=pytest.mark.slow),
    pytest.param(0.1, 50, 5, 8.0, marks=pytest.mark.slow),
    (0.02, 200, 20, 8.0),
    pytest.param(0.05, 30, 3, 50.0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("q", "steps", "n_prior", "target"), CASES)
def test_calibration_equals_the_old_bisection(q: float, steps: int, n_prior: int, target: float) -> None:
    prior = _ledger(q, max(1, steps // 10), n_prior, sigma=1.2, seed=n_prior)
    expected = _reference_calibrate(prior=prior, q=q, steps=steps, target=target)

    sigma = calibrate_noise(prior_history=prior, sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)

    assert sigma == pytest.approx(expected, rel=1e-3)  # the bisection's tolerance
    assert epsilon_for(history=prior + [(sigma, q, steps)], delta=DELTA) <= target


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0, 20.0])
@pytest.mark.parametrize("q", [0.004, 0.05, 0.25, 1.0])
@pytest.mark.parametrize("steps", [1, 40, 400])
def test_calibrated_noise_is_within_budget_and_minimal(target: float, q: float, steps: int) -> None:
    prior = _ledger(q, 5, 3, sigma=2.0, seed=1) if q < 1 else [(8.0, 1.0, 1), (4.0, 1.0, 1)]
    if epsilon_for(history=prior, delta=DELTA) >= target:  # the prior alone spent it: refused
        with pytest.raises(BudgetExceededError, match="already spent"):
            calibrate_noise(prior_history=prior, sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)
        return
    try:
        sigma = calibrate_noise(prior_history=prior, sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)
    except BudgetExceededError:
        assert epsilon_for(history=prior + [(50.0, q, steps)], delta=DELTA) > target
        return

    assert epsilon_for(history=prior + [(sigma, q, steps)], delta=DELTA) <= target
    # within the tolerance of the smallest: a step of the tolerance below it is over budget
    below = sigma - 1e-3 * max(1.0, sigma)
    assert below <= 0 or epsilon_for(history=prior + [(below, q, steps)], delta=DELTA) > target
    # and Opacus' own arithmetic agrees (to its rounding)
    assert _reference_epsilon(prior + [(sigma, q, steps)], DELTA) <= target * (1 + 1e-9)


def test_spent_budget_raises_the_same_error_as_before() -> None:
    prior = [(0.8, 0.1, 1000)]
    with pytest.raises(BudgetExceededError) as old:
        _reference_calibrate(prior=prior, q=0.1, steps=10, target=5.0)

    with pytest.raises(BudgetExceededError) as new:
        calibrate_noise(prior_history=prior, sample_rate=0.1, steps=10, target_epsilon=5.0, delta=DELTA)

    assert str(new.value) == str(old.value)


def test_spent_budget_is_refused_every_time_not_remembered_as_a_result() -> None:
    prior = [(0.8, 0.1, 1000)]
    for _ in range(2):
        with pytest.raises(BudgetExceededError, match="already spent"):
            calibrate_noise(prior_history=prior, sample_rate=0.1, steps=10, target_epsilon=5.0, delta=DELTA)


def test_a_zero_noise_entry_in_the_prior_spends_everything() -> None:
    with pytest.raises(BudgetExceededError, match="inf already spent"):
        calibrate_noise(prior_history=[(0.0, 0.1, 3)], sample_rate=0.1, steps=10, target_epsilon=5.0, delta=DELTA)


def test_misuse_still_fails_hard() -> None:
    good = {"prior_history": [], "sample_rate": 0.1, "steps": 10, "target_epsilon": 5.0, "delta": DELTA}
    for bad in ({"delta": 0.0}, {"delta": 1.5}, {"accountant": "gdp"}, {"sample_rate": 0.0}, {"target_epsilon": 0.0},
                {"prior_history": [(-1.0, 0.1, 5)]}, {"prior_history": [(1.0, 2.0, 5)]}):
        with pytest.raises(PrivacyError):
            calibrate_noise(**{**good, **bad})
    assert calibrate_noise(**{**good, "steps": 0}) == 0.0


def test_the_memo_answers_each_ledger_for_itself() -> None:
    q, steps, target = 0.05, 100, 6.0
    fresh = calibrate_noise(prior_history=[], sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)
    longer = calibrate_noise(prior_history=[(1.0, q, 200)], sample_rate=q, steps=steps, target_epsilon=target,
                             delta=DELTA)
    again = calibrate_noise(prior_history=[], sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)

    assert longer > fresh
    assert again == fresh


@pytest.mark.slow
def test_prv_accountant_is_still_calibrated_by_bisection() -> None:
    q, steps, target = 0.1, 20, 4.0

    sigma = calibrate_noise(prior_history=[], sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA,
                            accountant="prv", tolerance=0.05)

    assert epsilon_for(history=[(sigma, q, steps)], delta=DELTA, accountant="prv") <= target
    assert epsilon_for(history=[(sigma / 1.1, q, steps)], delta=DELTA, accountant="prv") > target


def test_a_long_distinct_ledger_is_accounted_in_one_pass() -> None:
    # 200 entries, every one a different noise: each entry's RDP is computed once, at the orders
    # that can matter, and the calibration agrees with the reference on the same ledger
    rng = random.Random(7)
    prior = [(8.0, 1.0, 1)] + [(1.5 * (1 + rng.uniform(0, 1e-3)), 0.02, 2) for _ in range(200)]

    sigma = calibrate_noise(prior_history=prior, sample_rate=0.02, steps=100, target_epsilon=8.0, delta=DELTA)

    assert epsilon_for(history=prior + [(sigma, 0.02, 100)], delta=DELTA) <= 8.0
    assert math.isfinite(sigma) and sigma > 0


def test_a_failed_final_check_falls_back_to_the_plain_bisection(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    real = privacy.epsilon_for
    calls = {"n": 0}

    def first_call_over_budget(**kwargs: object) -> float:
        calls["n"] += 1
        return math.inf if calls["n"] == 1 else real(**kwargs)  # the fast path's final check fails

    plain = privacy._calibrate_bisect([], 0.05, 100, 4.0, DELTA, "rdp", 50.0, 1e-3)
    monkeypatch.setattr(privacy, "epsilon_for", first_call_over_budget)

    with caplog.at_level("WARNING", logger="fedrad.common.privacy"):
        sigma = calibrate_noise(prior_history=[], sample_rate=0.05, steps=100, target_epsilon=4.0, delta=DELTA)

    assert sigma == plain
    assert calls["n"] > 2  # the bisection ran over epsilon_for
    assert "plain bisection" in caplog.text
