"""SecAgg+ settings and the documented quantization error bound (fast; no federation)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedrad.common.config import parse_study
from fedrad.common.errors import ConfigError, FederationError
from fedrad.server.secagg import SecAggSettings, aggregation_error_bound
from tests.conftest import small_study_dict


def _study(**fed: object):
    return parse_study(small_study_dict(federation={"num_hospitals": 4, "min_hospitals": 2, **fed}))


def test_defaults_are_valid_for_four_hospitals() -> None:
    s = SecAggSettings()
    s.check(_study())
    assert s.shares_for(4) == (4, 3)  # complete graph, strict majority: one dropout tolerated
    assert s.shares_for(5) == (5, 3)


def test_every_problem_is_reported_at_once() -> None:
    study = parse_study(small_study_dict(federation={"num_hospitals": 2, "min_hospitals": 1},
                                         strategy={"name": "fedmedian"}))
    with pytest.raises(ConfigError) as ei:
        SecAggSettings(reconstruction_threshold=1, clipping_range=0.0, modulus_range=3).check(study)
    text = "\n".join(ei.value.problems)
    for needle in ("at least 3 hospitals", "fedmedian", "reconstruction_threshold", "clipping_range", "modulus_range"):
        assert needle in text


def test_threshold_must_be_a_majority_and_quantization_must_not_overflow() -> None:
    with pytest.raises(ConfigError, match="strict majority"):
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
