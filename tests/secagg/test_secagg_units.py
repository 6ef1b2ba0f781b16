"""SecAgg+ settings, the reconstruction-threshold floor and the documented quantization error
bound (fast; no federation)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedrad.client.runtime import secagg_app
from fedrad.common.config import parse_study
from fedrad.common.errors import ConfigError, FederationError
from fedrad.server.secagg import (
    MIN_SURVIVORS,
    FedradSecAggPlusWorkflow,
    SecAggSettings,
    aggregation_error_bound,
    min_threshold,
)
from tests.conftest import small_study_dict


def _study(**fed: object):
    return parse_study(small_study_dict(federation={"num_hospitals": 4, "min_hospitals": 2, **fed}))


def test_defaults_are_valid_for_four_hospitals() -> None:
    s = SecAggSettings()
    s.check(_study())
    assert s.shares_for(4) == (4, 3)  # complete graph: one dropout tolerated
    assert s.shares_for(3) == (3, 3)  # three hospitals: none may drop (a sum of two is never unmasked)
    assert s.shares_for(5) == (5, 4)
    assert s.shares_for(6) == (6, 4)
    assert s.shares_for(7) == (7, 5)
    assert SecAggSettings(num_shares=4).shares_for(9) == (5, 4)  # SecAgg+ neighbourhoods: odd


def _coordinator_with_one_colluder_unmasks(n: int, t: int) -> bool:
    """Brute force: the colluder gives its share of both secrets; the coordinator tells every
    honest holder (the victim included) either "alive" (seed share) or "dropped" (key share)."""
    for told in itertools.product(("alive", "dropped"), repeat=n - 1):
        if 1 + told.count("alive") >= t and 1 + told.count("dropped") >= t:
            return True
    return False


@pytest.mark.parametrize("n", range(3, 10))
def test_threshold_floor_is_the_smallest_that_defeats_one_colluder(n: int) -> None:
    t = min_threshold(n)
    assert MIN_SURVIVORS <= t <= n
    assert not _coordinator_with_one_colluder_unmasks(n, t)
    if t - 1 >= MIN_SURVIVORS:  # the floor is tight: one lower and the attack works
        assert _coordinator_with_one_colluder_unmasks(n, t - 1)
    assert secagg_app.min_threshold(n) == t  # the hospital enforces the same floor


def _recovers(shares: list[bytes], secret: bytes) -> bool:
    try:
        return combine_shares(shares) == secret
    except ValueError:  # too few shares: the padding of the combined value is garbage
        return False


def test_old_strict_majority_threshold_let_one_colluder_unmask_with_real_shares() -> None:
    """Flower's own Shamir shares, 5 holders: the victim v, colluder j, honest h1..h3."""
    n = 5
    seed, key = os.urandom(32), os.urandom(32)

    def attack(t: int) -> tuple[bool, bool]:
        b, s = create_shares(seed, t, n), create_shares(key, t, n)
        # holder 0 = j (both), holders 1, 2 (v, h1) told "alive", holders 3, 4 told "dropped"
        got_b, got_s = [b[0], b[1], b[2]], [s[0], s[3], s[4]]
        return _recovers(got_b, seed), _recovers(got_s, key)

    assert attack(n // 2 + 1) == (True, True)  # t = 3 (strict majority): both secrets of v recovered
    assert attack(min_threshold(n)) == (False, False)  # t = 4: neither
    # and with both secrets the victim's masked vector is open: its private mask is PRG(seed)
    assert pseudo_rand_gen(seed, 2**32, [(3,)])[0].shape == (3,)


def test_a_low_threshold_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="colluding hospital"):
        SecAggSettings(reconstruction_threshold=3).check(_study(num_hospitals=5))
    SecAggSettings(reconstruction_threshold=4).check(_study(num_hospitals=5))


def test_the_coordinator_never_unmasks_fewer_than_three() -> None:
    with pytest.raises(ValueError, match=">= 3"):
        FedradSecAggPlusWorkflow(SecAggSettings(), min_survivors=2, timeout=1.0, shapes=[(1,)])


def test_every_problem_is_reported_at_once() -> None:
    study = parse_study(small_study_dict(federation={"num_hospitals": 2, "min_hospitals": 1},
                                         strategy={"name": "fedmedian"}))
    with pytest.raises(ConfigError) as ei:
        SecAggSettings(reconstruction_threshold=1, clipping_range=0.0, modulus_range=3).check(study)
    text = "\n".join(ei.value.problems)
    for needle in ("at least 3 hospitals", "fedmedian", "reconstruction_threshold", "clipping_range", "modulus_range"):
        assert needle in text


def test_threshold_must_be_a_majority_and_quantization_must_not_overflow() -> None:
    with pytest.raises(ConfigError, match="must be in 3..4"):
        SecAggSettings(reconstruction_threshold=2).check(_study())
    with pytest.raises(ConfigError, match="overflow"):
        SecAggSettings(quantization_range=2**31).check(_study())
    with pytest.raises(FederationError, match="at least 3"):
        SecAggSettings().shares_for(2)


def test_flower_quantization_stays_within_the_documented_bound() -> None:
    """Replays SecAgg+'s arithmetic (without the masks, which cancel exactly mod 2**32)."""
    rng = np.random.default_rng(0)
    c, q_range, m, w = 1.0, 2**22, 2**32, 1000.0
    ns = [64, 17, 250]
    xs = [rng.normal(0, 0.05, size=5000) for _ in ns]
    total = None
    for n, x in zip(ns, xs):  # the client side of secaggplus_mod._collect_masked_vectors
        q_ratio = round(n / w * q_range)
        vec = factor_combine(q_ratio, quantize(parameters_multiply([x], q_ratio / q_range), c, q_range))
        vec = [v.astype(np.int64) for v in vec]
        total = vec if total is None else [a + b for a, b in zip(total, vec)]
    assert total is not None
    total = [v % m for v in total]
    q_sum, rest = factor_extract(total)  # the server side of SecAggPlusWorkflow.unmask_stage
    agg = dequantize(rest, c, q_range)[0]
    agg = (agg - (len(ns) - 1) * c) * (q_range / q_sum)
    exact = np.average(np.stack(xs), axis=0, weights=ns)
    bound = aggregation_error_bound(ns, clipping_range=c, quantization_range=q_range, max_weight=w)
    err = float(np.max(np.abs(agg - exact)))
    assert err < bound, (err, bound)
    assert bound < 1e-4  # and the bound is small against the update scale (0.05)


def _replay(ns: list[int], xs: list[np.ndarray], *, c: float, q_range: int, w: float, m: int = 2**32) -> np.ndarray:
    total = None
    for n, x in zip(ns, xs):
        q_ratio = round(n / w * q_range)
        vec = factor_combine(q_ratio, quantize(parameters_multiply([x], q_ratio / q_range), c, q_range))
        vec = [v.astype(np.int64) for v in vec]
        total = vec if total is None else [a + b for a, b in zip(total, vec)]
    assert total is not None
    q_sum, rest = factor_extract([v % m for v in total])
    return (dequantize(rest, c, q_range)[0] - (len(ns) - 1) * c) * (q_range / q_sum)


def test_unclipped_alone_does_not_give_the_3ck_bound() -> None:
    """The old docstring's condition (|x_i| <= c w / n_i, nothing clipped) is not enough: a small
    hospital's large coordinates make the weight rounding exceed 3 c k / sum q_i. The bound with
    the true max |x_i| holds."""
    rng = np.random.default_rng(1)
    c, q_range, w = 1.0, 2**22, 1000.0
    ns = [1000, 3]
    xs = [rng.normal(0, 0.05, size=4000), 300.0 * np.sign(rng.normal(size=4000))]
    assert 300.0 <= c * w / ns[1]  # the old condition holds...
    assert round(ns[1] / w * q_range) / q_range * 300.0 <= c  # ...and nothing is clipped
    err = float(np.max(np.abs(_replay(ns, xs, c=c, q_range=q_range, w=w) - np.average(np.stack(xs), axis=0, weights=ns))))
    assert err > aggregation_error_bound(ns, clipping_range=c, quantization_range=q_range, max_weight=w)
    assert err < aggregation_error_bound(ns, clipping_range=c, quantization_range=q_range, max_weight=w,
                                         max_abs_update=300.0)


@pytest.mark.parametrize("seed", range(5))
def test_bound_holds_under_its_stated_condition(seed: int) -> None:
    """|x_i| <= c everywhere and n_i <= w, including small hospitals and updates at the edge."""
    rng = np.random.default_rng(seed)
    c, q_range, w = 0.5, 2**16, 500.0  # coarse quantization: the rounding terms are visible
    ns = [int(v) for v in rng.integers(1, 501, size=4)]
    xs = [rng.uniform(-c, c, size=3000) for _ in ns]
    xs[0][:10] = c  # coordinates at the clipping range itself
    err = float(np.max(np.abs(_replay(ns, xs, c=c, q_range=q_range, w=w) - np.average(np.stack(xs), axis=0, weights=ns))))
    bound = aggregation_error_bound(ns, clipping_range=c, quantization_range=q_range, max_weight=w)
    assert err < bound, (err, bound)
    assert err > bound / 100  # the bound is not vacuous at this quantization
