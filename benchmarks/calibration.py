"""Cost of one noise calibration (``fedrad.common.privacy.calibrate_noise``), old vs new, side by side
in one process (a benchmark, not a test).

"old" is the bisection as it was before issue 14's follow-up (each probe: Opacus' ``compute_rdp``
at all 151 orders for the probe's noise, the prior's per-entry RDP vectors lru-cached), kept here
verbatim as a reference; "new" is the library function. Each row is one plan on a ledger whose
prior history is either *realistic* (a size release, then one entry per earlier round of the same
study, each round calibrated for the study's remaining rounds as a node does) or *distinct* (the
same, but every entry's noise jittered so no two entries share a per-step RDP vector: the worst
case for any cache).

Regimes: ``cold`` = every cache empty (a fresh process: the CLI, a new simulation, a node that just
started); ``warm`` = the prior's per-entry RDP already cached (a long-running node that has computed
its ledger's epsilon), nothing cached about the new plan. Usage::

    python benchmarks/calibration.py            # the table in benchmarks/results/calib.md
    python benchmarks/calibration.py --quick    # fewer, smaller cases
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedrad.common import privacy, rdp

HistoryEntry = tuple[float, float, int]
ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)


# ------------------------------------------------------------------ the old implementation (reference)
@lru_cache(maxsize=4096)
def _old_rdp_one_step(q: float, sigma: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS), dtype=np.float64)


def old_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    hist = [h for h in history if int(h[2]) > 0]
    if not hist:
        return 0.0
    if any(float(s) == 0.0 for s, _, _ in hist):
        return float("inf")
    total = np.zeros(len(ORDERS))
    for sigma, q, steps in hist:
        total = total + _old_rdp_one_step(float(q), float(sigma)) * int(steps)
    eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


def old_calibrate(*, prior_history: Sequence[HistoryEntry], sample_rate: float, steps: int, target_epsilon: float,
                  delta: float, max_noise_multiplier: float = 50.0, tolerance: float = 1e-3) -> float:
    prior = list(prior_history)

    def eps(sigma: float) -> float:
        return old_epsilon(prior + [(sigma, sample_rate, steps)], delta)

    hi = max_noise_multiplier
    if eps(hi) > target_epsilon:
        raise privacy.BudgetExceededError("budget spent")
    lo = 0.0
    while hi - lo > tolerance * max(1.0, lo):
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# ------------------------------------------------------------------ cases
def ledger(*, q: float, steps_per_round: int, study_rounds: int, done: int, target: float, delta: float,
           distinct: bool, seed: int = 0) -> list[HistoryEntry]:
    """The study's ledger after ``done`` of its ``study_rounds`` rounds, as a node writes it."""
    rng = random.Random(seed)
    hist: list[HistoryEntry] = [(8.0, 1.0, 1)]  # the size release
    for r in range(done):
        sigma = privacy.calibrate_noise(prior_history=hist, sample_rate=q, steps=steps_per_round * (study_rounds - r),
                                        target_epsilon=target, delta=delta)
        if distinct:
            sigma *= 1 + rng.uniform(0, 1e-3)
        hist.append((sigma, q, steps_per_round))
    return hist


def clear_caches() -> None:
    _old_rdp_one_step.cache_clear()
    rdp._RDP_CACHE.clear()
    privacy._CALIBRATIONS.clear()


def timed(fn: Callable[[], float], *, warm_prior: Callable[[], object] | None, repeat: int) -> tuple[float, float]:
    """Median seconds of ``fn`` over ``repeat`` runs, each from empty caches (then ``warm_prior``)."""
    times, value = [], float("nan")
    for _ in range(repeat):
        clear_caches()
        if warm_prior is not None:
            warm_prior()
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat-old", type=int, default=1, help="runs of the old implementation per cell (median)")
    ap.add_argument("--repeat-new", type=int, default=5, help="runs of the new implementation per cell (median)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    delta = 1e-5
    # (q, steps per round, rounds done before this plan, target epsilon); 10 rounds left in the study
    cases = [(0.01, 50, 0, 8.0), (0.05, 10, 0, 8.0), (0.3, 1, 0, 4.0), (0.1, 5, 0, 1.0),
             (0.05, 10, 10, 8.0), (0.1, 5, 50, 8.0), (0.02, 20, 200, 8.0), (0.3, 2, 200, 50.0)]
    if args.quick:
        cases = [c for c in cases if c[2] <= 10]
    print("| q | steps | prior entries | target eps | ledger | old cold | new cold | old warm | new warm | same sigma |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for q, spr, done, target in cases:
        for distinct in ((False, True) if done else (False,)):
            hist = ledger(q=q, steps_per_round=spr, study_rounds=done + 10, done=done, target=target, delta=delta,
                          distinct=distinct)
            steps = spr * 10
            plan = {"prior_history": hist, "sample_rate": q, "steps": steps, "target_epsilon": target, "delta": delta}
            old_run = partial(old_calibrate, **plan)
            new_run = partial(privacy.calibrate_noise, **plan)
            old_prior = partial(old_epsilon, hist, delta)
            new_prior = partial(privacy.epsilon_for, history=hist, delta=delta)
            old_c, old_sigma = timed(old_run, warm_prior=None, repeat=args.repeat_old)
            new_c, new_sigma = timed(new_run, warm_prior=None, repeat=args.repeat_new)
            old_w, _ = timed(old_run, warm_prior=old_prior, repeat=args.repeat_old)
            new_w, _ = timed(new_run, warm_prior=new_prior, repeat=args.repeat_new)
            print(f"| {q} | {steps} | {len(hist)} | {target:g} | {'distinct' if distinct else 'realistic'} "
                  f"| {old_c * 1e3:.0f} ms | {new_c * 1e3:.1f} ms | {old_w * 1e3:.0f} ms | {new_w * 1e3:.1f} ms "
                  f"| {'yes' if old_sigma == new_sigma else f'{old_sigma!r} vs {new_sigma!r}'} |", flush=True)

    print()
    print("| node, one process, a 20-round study (q, steps/round, target) | old: mean per round | new: mean per round "
          "| same sigmas |")
    print("|---|---|---|---|")
    for q, spr, target in [(0.05, 10, 8.0), (0.01, 50, 4.0)]:
        row = []
        for calibrate in (old_calibrate, privacy.calibrate_noise):
            clear_caches()
            hist: list[HistoryEntry] = [(8.0, 1.0, 1)]
            t = time.perf_counter()
            for r in range(20):
                sigma = calibrate(prior_history=hist, sample_rate=q, steps=spr * (20 - r), target_epsilon=target,
                                  delta=delta)
                hist.append((sigma, q, spr))
            row.append(((time.perf_counter() - t) / 20, hist))
        (old_t, old_h), (new_t, new_h) = row
        print(f"| {q}, {spr}, {target:g} | {old_t * 1e3:.0f} ms | {new_t * 1e3:.1f} ms | {'yes' if old_h == new_h else 'no'} |",
              flush=True)


if __name__ == "__main__":
    main()
