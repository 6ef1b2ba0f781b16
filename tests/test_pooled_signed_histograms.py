"""Issue 10: pooled validation from many sites' noisy histograms is unbiased.

Each site releases its noisy counts rounded but NOT clipped (signed integers); the coordinator sums
the signed histograms and clips at 0 only after pooling. Clipping every site's histogram at 0 before
sending biased every empty cell upwards (by about 0.4 noise std per empty cell and site).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrad.client.privacy.releases import gaussian_histograms
from fedrad.common.metrics import (
    HIST_BINS,
    num_examples_from_histograms,
    pool_histograms,
    score_histograms,
    summarise_histograms,
)
from fedrad.common.protocol import HIST_COUNT_LIMIT

SITES, SIGMA, PER_SITE = 20, 4.0, 60


def _site_histograms(seed: int) -> list[np.ndarray]:
    """20 sites' exact histograms of a known, well-separated binary score distribution."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(SITES):
        labels = rng.integers(0, 2, PER_SITE)
        z = rng.normal(size=PER_SITE) * 1.2 + 3.0 * (2 * labels - 1)
        p1 = 1 / (1 + np.exp(-z))
        out.append(score_histograms(labels, np.stack([1 - p1, p1], 1)))
    return out


def test_a_sites_release_is_signed_and_unclipped() -> None:
    zeros = np.zeros((2, 2, HIST_BINS), dtype=np.int64)

    noisy = gaussian_histograms(zeros, noise_multiplier=SIGMA)

    assert noisy.dtype == np.int64
    assert (noisy < 0).any()  # empty cells stay centred on 0
    assert np.abs(noisy).max() <= HIST_COUNT_LIMIT


def test_pooling_twenty_sites_gives_an_unbiased_total() -> None:
    exact = _site_histograms(0)
    truth = int(sum(h[0].sum() for h in exact))
    noisy = [gaussian_histograms(h, noise_multiplier=SIGMA) for h in exact]
    # The class-0 slice has 2 * HIST_BINS cells per site, each with noise std SIGMA * sqrt(2).
    std_total = SIGMA * math.sqrt(2) * math.sqrt(2 * HIST_BINS * SITES)

    pooled_total = num_examples_from_histograms(pool_histograms(noisy))
    clipped_total = sum(int(np.clip(h, 0, None)[0].sum()) for h in noisy)  # the old per-site clipping

    assert abs(pooled_total - truth) < 4 * std_total
    assert clipped_total - truth > 10 * std_total  # what issue 10 reported


def test_pooled_auc_and_threshold_match_the_noise_free_ones() -> None:
    # Moderate noise (per-cell std 0.7 per site): clipping after pooling leaves a small bias only,
    # clipping on every site pulled the pooled AUC of this near-perfect model down to about 0.88.
    exact = _site_histograms(1)
    clean = summarise_histograms(pool_histograms(exact))
    signed, clipped = [], []
    for rep in range(5):
        noisy = [gaussian_histograms(h, noise_multiplier=0.5) for h in exact]
        signed.append(summarise_histograms(pool_histograms(noisy)))
        clipped.append(summarise_histograms(pool_histograms([np.clip(h, 0, None) for h in noisy])))

    auc_signed = float(np.mean([s.auc for s in signed]))
    auc_clipped = float(np.mean([s.auc for s in clipped]))

    assert clean.auc > 0.95
    assert abs(auc_signed - clean.auc) < 0.06
    assert abs(auc_signed - clean.auc) < 0.5 * abs(auc_clipped - clean.auc)  # clipping per site pulls AUC to 0.5
    assert all(s.threshold is not None for s in signed)
    logit = [math.log(s.threshold / (1 - s.threshold)) for s in signed]  # type: ignore[operator]
    assert abs(float(np.median(logit)) - math.log(clean.threshold / (1 - clean.threshold))) < 1.5  # type: ignore[operator]


def test_per_site_figures_clip_for_display_and_never_crash() -> None:
    hist = np.zeros((2, 2, HIST_BINS), dtype=np.int64)
    hist[1, 1, -3:] = 5
    hist[1, 0, :3] = 5
    hist[0] = hist[1][::-1]
    hist[1, 0, 20] = -7  # a negative noisy cell

    s = summarise_histograms(hist)

    assert 0.0 <= s.auc <= 1.0 and 0.0 <= s.sensitivity <= 1.0 and 0.0 <= s.specificity <= 1.0
    assert s.num_examples == max(0, int(hist[0].sum()))
    assert num_examples_from_histograms(-np.ones((2, 2, HIST_BINS), dtype=np.int64)) == 0


@pytest.mark.parametrize("value", [HIST_COUNT_LIMIT + 1, -HIST_COUNT_LIMIT - 1])
def test_the_node_never_sends_counts_beyond_the_contract(value: int) -> None:
    hist = np.full((2, 2, HIST_BINS), value, dtype=np.int64)

    noisy = gaussian_histograms(hist, noise_multiplier=0.5)

    assert np.abs(noisy).max() <= HIST_COUNT_LIMIT
