"""The node's one-off and per-evaluation DP releases: the training set's size, its per-class counts
(once per dataset, stored in the ledger and re-sent unchanged), and the score histograms of an
evaluation. Each is a Gaussian mechanism; the randomness is OS entropy unless a reproducible
simulation passes a seed. Everything else the node derives from them is post-processing.
"""

from __future__ import annotations

import math

import numpy as np

from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.common.errors import PrivacyError
from fedrad.common.planning import DATASET_RELEASE_NOISE_MULTIPLIER
from fedrad.common.protocol import HIST_COUNT_LIMIT

#: Noise multiplier of the one-off release of the training set's size (a count: sensitivity 1, so
#: the noise std is 8 examples). Charged to the training account as (8, q=1, 1 step). The
#: trade-off (issue 10): at small budgets it costs noise (demo at epsilon 1: noise multiplier 3.90
#: instead of 3.42 without the release; at epsilon 0.5: 21.3 instead of 6.25; at 20 it would be
#: 3.48 and 6.74), but a larger std makes a small site's plan unreliable (a 64-image site released
#: as 18 plans batches of 4.5 and is refused as hopeless): 8 was kept.
SIZE_NOISE_MULTIPLIER = DATASET_RELEASE_NOISE_MULTIPLIER


def released_size(*, ledger: PrivacyLedger, true_size: int, seed: int | None = None) -> int:
    """The training set's DP-released size: released once per dataset (Gaussian noise, std
    :data:`SIZE_NOISE_MULTIPLIER`, charged to the ledger), stored, and returned unchanged ever after.

    ``seed``: only for a simulation with ``simulation.reproducible_randomness``; else OS entropy.
    """
    if ledger.released_size is not None:
        return ledger.released_size
    if true_size < 1:
        raise PrivacyError("cannot release the size of an empty training set")
    rng = np.random.default_rng(seed)  # None: 128 bits of OS entropy
    value = max(1, int(round(true_size + SIZE_NOISE_MULTIPLIER * float(rng.standard_normal()))))
    ledger.release_size(value=value, noise_multiplier=SIZE_NOISE_MULTIPLIER)
    return value


#: Noise multiplier of the one-off release of the training set's per-class counts (class weighting):
#: a histogram of L2 sensitivity 1, charged like the size release.
CLASS_COUNTS_NOISE_MULTIPLIER = DATASET_RELEASE_NOISE_MULTIPLIER


def released_class_counts(*, ledger: PrivacyLedger, labels: np.ndarray, num_classes: int,
                          seed: int | None = None) -> list[int]:
    """The training set's DP-released per-class counts: released once per dataset (Gaussian noise,
    std :data:`CLASS_COUNTS_NOISE_MULTIPLIER`, charged to the ledger), stored and reused ever after.
    Rounded and clipped at 0 (post-processing). ``seed``: reproducible simulation only."""
    stored = ledger.released_class_counts
    if stored is not None:
        if len(stored) != num_classes:
            raise PrivacyError(f"the ledger's released class counts have {len(stored)} classes, the data {num_classes}")
        return stored
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    rng = np.random.default_rng(seed)  # None: 128 bits of OS entropy
    noisy = counts + CLASS_COUNTS_NOISE_MULTIPLIER * rng.standard_normal(num_classes)
    values = [int(v) for v in np.clip(np.rint(noisy), 0, None)]
    ledger.release_class_counts(values=values, noise_multiplier=CLASS_COUNTS_NOISE_MULTIPLIER)
    return values


def balanced_class_weights(*, counts: list[int]) -> list[float]:
    """Per-class weights in (0, 1] from (released) counts: the rarest class 1, class k
    ``min_count / count_k`` (each count floored at 1, so an empty class gets weight 1 and the
    others stay positive). Post-processing of a DP release; costs nothing."""
    if not counts:
        raise PrivacyError("class weights need at least one class count")
    c = [max(1, int(v)) for v in counts]
    m = min(c)
    return [m / v for v in c]


def histogram_noise_std(*, noise_multiplier: float, num_classes: int) -> float:
    """Standard deviation of the Gaussian noise :func:`gaussian_histograms` adds to each count:
    ``noise_multiplier * sqrt(c)``. A property of the mechanism (the node's plan and the class count),
    not of the data: the node reports it beside the histograms (``histogram-noise-std``)."""
    if not noise_multiplier > 0 or math.isnan(noise_multiplier):
        raise PrivacyError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if num_classes < 1:
        raise PrivacyError(f"num_classes must be >= 1, got {num_classes}")
    return float(noise_multiplier * math.sqrt(num_classes))


def gaussian_histograms(hist: np.ndarray, *, noise_multiplier: float, seed: int | None = None) -> np.ndarray:
    """The Gaussian mechanism over a (c, 2, bins) histogram: adding or removing one example changes
    one count in each of the c class slices, so the L2 sensitivity is sqrt(c); noise std is
    ``noise_multiplier * sqrt(c)``. Rounded to signed integers and NOT clipped at 0 (issue 10: a
    count clipped on every site biases each empty cell upwards, and pooling 20 sites adds those
    biases up; the coordinator clips after pooling). Bounded to +-:data:`HIST_COUNT_LIMIT` (the
    contract's range; post-processing). ``seed``: only for a reproducible simulation; else OS entropy."""
    h = np.asarray(hist, dtype=np.float64)
    std = histogram_noise_std(noise_multiplier=noise_multiplier, num_classes=h.shape[0])
    rng = np.random.default_rng(seed)  # None: 128 bits of OS entropy
    noisy = h + rng.normal(0.0, std, size=h.shape)
    return np.clip(np.rint(noisy), -HIST_COUNT_LIMIT, HIST_COUNT_LIMIT).astype(np.int64)
