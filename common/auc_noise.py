"""How far a validation AUC computed from (noisy) score histograms can move by chance.

A pooled validation AUC (:func:`fedrad.common.metrics.macro_auc_from_histograms` of the sites'
summed histograms) varies for two reasons when the same model is validated again: the validation
examples are a sample, and every count carries the sites' Gaussian DP noise. At the default
budgets the second dominates: with 20 small sites the pooled AUC of successive rounds jumped
between 0.51 and 0.72 while the models' test AUC rose steadily from 0.70 to 0.92 (BENCHMARKS.md,
issue 10), so "the round with the best pooled AUC" was a draw of the noise.

:func:`auc_standard_error` measures that spread by a parametric bootstrap on the pooled counts:
each replicate redraws the sample (Poisson counts around the clipped pooled counts) and adds fresh
Gaussian noise of the pooled mechanism's standard deviation (the root sum of squares of the
sites' stated per-count noise std), then computes the AUC as the coordinator does (clip at 0,
binned Mann-Whitney). The replicates start from counts that already carry noise (clipped at 0), so
the estimate is rough: against the real spread of repeated noisy measurements of one model (20 sites
of 30 examples, ``tests/test_auc_noise.py``) it was 1.15x at noise multiplier 0.5, 0.82x at 2.7 and
0.76x at 6.3. The model choice asks for two standard errors of the difference, which absorbs that.

Post-processing of DP releases only (no privacy cost); the bootstrap's own randomness is a fixed
seed, so a resumed study computes the same figures again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .metrics import macro_auc_from_histograms, nonnegative

#: Bootstrap replicates per standard error (about 4 ms for a binary histogram).
REPLICATES = 200
#: Seed of the bootstrap (coordinator-side post-processing; fixed so that re-computation agrees).
SEED = 20261130


def pooled_noise_std(stds: Iterable[float | None]) -> float | None:
    """Per-count noise std of a sum of histograms whose own stds are ``stds`` (root sum of squares);
    None if no site stated one (unknown noise), else the stated ones only."""
    known = [float(s) for s in stds if s is not None and math.isfinite(float(s)) and float(s) >= 0]
    if not known:
        return None
    total = math.sqrt(sum(s * s for s in known))
    return total if math.isfinite(total) else None


def auc_standard_error(hist: np.ndarray, *, noise_std: float | None, replicates: int = REPLICATES,
                       seed: int = SEED) -> float | None:
    """Standard deviation of the (macro) AUC of ``hist`` under re-measurement: resampled examples
    plus fresh noise of per-count std ``noise_std`` (None or 0: sampling only). None when the AUC is
    undefined (a class without examples) in fewer than half of the replicates."""
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2, got {replicates}")
    if noise_std is not None and (not math.isfinite(noise_std) or noise_std < 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    base = nonnegative(np.asarray(hist))
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    for _ in range(replicates):
        rep = rng.poisson(base).astype(np.float64)
        if noise_std:
            rep += rng.normal(0.0, noise_std, size=base.shape)
        a = macro_auc_from_histograms(rep)
        if math.isfinite(a):
            aucs.append(a)
    if len(aucs) < max(2, replicates // 2):
        return None
    return float(np.std(aucs, ddof=1))


def noise_margin(se_a: float | None, se_b: float | None, *, z: float) -> float:
    """``z`` standard errors of the difference of two independent measurements (0 if either is unknown)."""
    return z * math.hypot(se_a, se_b) if se_a is not None and se_b is not None else 0.0


def beats_beyond_noise(better: float, worse: float, *, se_better: float | None, se_worse: float | None,
                       z: float) -> bool:
    """Whether AUC ``better`` exceeds ``worse`` by more than :func:`noise_margin` (unknown errors: a
    plain comparison)."""
    return better - worse > noise_margin(se_better, se_worse, z=z)
