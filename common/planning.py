"""Per-site DP training plan: sampling rate, steps and noise from a site's (released) size and budget.

Pure functions over data-independent inputs (the study's configuration, the site's DP-released
training-set size and its ledger history), so the hospital node plans with them and the
coordinator's dry run can show the same plan from the sizes it assumes.

Sampling (:func:`sampling_plan`): ``k = max(ceil(n / batch_size), MIN_BATCHES_PER_EPOCH)``
Poisson batches per epoch at rate ``q = 1 / k``, ``k x local_epochs`` steps per round. A large
site gets exactly Opacus' ``batch_size`` plan; a site with fewer than ``MIN_BATCHES_PER_EPOCH x
batch_size`` examples gets smaller expected batches instead of one full-batch step at q = 1,
so every site has real subsampling (``q <= MAX_SAMPLE_RATE``, privacy amplification) and at
least ``MIN_BATCHES_PER_EPOCH`` noisy steps per round.

Usefulness (:func:`assess`): the Gaussian noise DP-SGD adds to the *averaged* clipped gradient
has standard deviation ``noise_multiplier x max_grad_norm / expected_batch_size`` per
coordinate, while the signal is at most ``max_grad_norm``. Their ratio
``noise_per_example = noise_multiplier / expected_batch_size`` decides whether training can
learn anything. Thresholds (heuristic, from PneumoniaMNIST runs; issue 10 and BENCHMARKS.md):

* ``<= MARGINAL_NOISE_PER_EXAMPLE`` (0.05): ok. The demo's sites at epsilon 1-8 sit at 0.007-0.047
  and learn (test AUC 0.9+); small sites of ~225 images at epsilon 8 sit at 0.03.
* above it: marginal, a logged warning on the node and a dry-run line ("expect little learning;
  raise epsilon or rounds"). The demo at epsilon 0.5 sits at 0.055-0.09 (issue 10 measured a
  one-class model there, at 0.05-0.07 with the plan before this one).
* above ``HOPELESS_NOISE_PER_EXAMPLE`` (0.25), or a noise multiplier above
  ``HOPELESS_NOISE_MULTIPLIER`` (25): hopeless; the node refuses the study before its first
  step (only the one-off size release is spent), with the reason in the refusal the coordinator
  shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import BudgetExceededError, PrivacyError
from .privacy import HistoryEntry, calibrate_noise, epsilon_for

if TYPE_CHECKING:
    from .config import StudyConfig

#: Largest Poisson sampling rate a plan uses (1 / MIN_BATCHES_PER_EPOCH).
MIN_BATCHES_PER_EPOCH = 4
MAX_SAMPLE_RATE = 1.0 / MIN_BATCHES_PER_EPOCH
MARGINAL_NOISE_PER_EXAMPLE = 0.05
HOPELESS_NOISE_PER_EXAMPLE = 0.25
HOPELESS_NOISE_MULTIPLIER = 25.0

Verdict = Literal["ok", "marginal", "hopeless"]


@dataclass(frozen=True)
class Sampling:
    sample_rate: float
    steps: int
    expected_batch_size: float


@dataclass(frozen=True)
class Assessment:
    verdict: Verdict
    noise_per_example: float
    message: str


@dataclass(frozen=True)
class SitePlan:
    """One site's whole-study plan (for a dry run and the node's log)."""

    site: str
    released_size: int
    sample_rate: float
    steps_per_round: int
    expected_batch_size: float
    noise_multiplier: float
    rounds: int
    #: The site's epsilon after the whole study (its size release included), at ``delta``.
    expected_epsilon: float
    delta: float
    assessment: Assessment

    def line(self) -> str:
        return (f"{self.site}: released size {self.released_size}, q {self.sample_rate:.4f} "
                f"(expected batch {self.expected_batch_size:.1f}), {self.steps_per_round} steps/round x {self.rounds} "
                f"rounds, noise multiplier {self.noise_multiplier:.3f}, expected epsilon "
                f"{self.expected_epsilon:.3f} (delta {self.delta:g}): {self.assessment.verdict}"
                + (f" ({self.assessment.message})" if self.assessment.verdict != "ok" else ""))


def sampling_plan(*, num_examples: int, batch_size: int, local_epochs: int) -> Sampling:
    """Poisson sampling rate, steps per round and expected batch size for a site of ``num_examples``
    (its released size: data-independent). See the module docstring for the rule."""
    if num_examples < 1 or batch_size < 1 or local_epochs < 1:
        raise PrivacyError(f"num_examples, batch_size and local_epochs must be >= 1 "
                           f"(got {num_examples}, {batch_size}, {local_epochs})")
    k = max(math.ceil(num_examples / batch_size), MIN_BATCHES_PER_EPOCH)
    q = 1.0 / k
    return Sampling(sample_rate=q, steps=k * local_epochs, expected_batch_size=q * num_examples)


def assess(*, noise_multiplier: float, expected_batch_size: float, site: str = "this site") -> Assessment:
    """Whether a plan can be expected to learn (thresholds in the module docstring)."""
    if not expected_batch_size > 0:
        raise PrivacyError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    ratio = noise_multiplier / expected_batch_size
    if ratio > HOPELESS_NOISE_PER_EXAMPLE or noise_multiplier > HOPELESS_NOISE_MULTIPLIER:
        return Assessment("hopeless", ratio, (
            f"noise multiplier {noise_multiplier:.3g} at {site} on expected batches of {expected_batch_size:.1f} "
            f"(noise {ratio:.3g} x the clipping norm per example, limit {HOPELESS_NOISE_PER_EXAMPLE:g}): the budget "
            "cannot buy useful training; raise epsilon or lower rounds/local epochs"))
    if ratio > MARGINAL_NOISE_PER_EXAMPLE:
        return Assessment("marginal", ratio, (
            f"noise multiplier {noise_multiplier:.3g} at {site} on expected batches of {expected_batch_size:.1f} "
            f"(noise {ratio:.3g} x the clipping norm per example, above {MARGINAL_NOISE_PER_EXAMPLE:g}): expect "
            "little learning; raise epsilon or rounds"))
    return Assessment("ok", ratio, "")


def plan_site(
    *,
    site: str,
    released_size: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    epsilon: float,
    delta: float,
    accountant: str = "rdp",
    max_noise_multiplier: float = 50.0,
    noise_multiplier: float | None = None,
    prior_history: Sequence[HistoryEntry] = (),
) -> SitePlan:
    """A site's whole-study plan on a ledger holding ``prior_history`` (for a new site: its size
    release), as the node will compute it in round 1. Raises nothing for a hopeless plan (it is in
    the assessment); :class:`BudgetExceededError` when the budget cannot fit the study at all."""
    s = sampling_plan(num_examples=released_size, batch_size=batch_size, local_epochs=local_epochs)
    prior = list(prior_history)
    if noise_multiplier is None:
        try:
            sigma = calibrate_noise(prior_history=prior, sample_rate=s.sample_rate, steps=s.steps * rounds,
                                    target_epsilon=epsilon, delta=delta, accountant=accountant,
                                    max_noise_multiplier=max_noise_multiplier)
        except BudgetExceededError as exc:
            raise BudgetExceededError(f"{site}: {exc}") from None
    else:
        sigma = noise_multiplier
    eps = epsilon_for(history=prior + [(sigma, s.sample_rate, s.steps * rounds)], delta=delta, accountant=accountant)
    return SitePlan(site=site, released_size=released_size, sample_rate=s.sample_rate, steps_per_round=s.steps,
                    expected_batch_size=s.expected_batch_size, noise_multiplier=sigma, rounds=rounds,
                    expected_epsilon=eps, delta=delta,
                    assessment=assess(noise_multiplier=sigma, expected_batch_size=s.expected_batch_size, site=site))


#: Noise multiplier of a node's one-off dataset releases (its training set's noisy size, and with
#: class weighting its noisy per-class counts): sensitivity 1, so the noise std is 8 examples
#: (see fedrad.client.privacy.releases.SIZE_NOISE_MULTIPLIER for the trade-off).
DATASET_RELEASE_NOISE_MULTIPLIER = 8.0


def dry_run_plans(study: "StudyConfig", sizes: dict[str, int]) -> list[SitePlan]:
    """Every site's plan for ``study`` on a fresh ledger, from the training-set sizes the caller
    assumes (``{site name: size}``; a node plans from its DP-released size, within about +-16 of
    the true one). The prior history is what a new node spends before round 1: its size release,
    and its class-count release when ``training.class_weighting`` is on. For ``fedrad simulate
    --dry-run``: print :meth:`SitePlan.line` for each."""
    priv, tr = study.privacy, study.training
    if not priv.enabled:
        raise PrivacyError("a study without DP has no privacy plan")
    prior: list[HistoryEntry] = [(DATASET_RELEASE_NOISE_MULTIPLIER, 1.0, 1)]
    if tr.class_weighting != "none":
        prior.append((DATASET_RELEASE_NOISE_MULTIPLIER, 1.0, 1))
    return [
        plan_site(site=name, released_size=max(1, int(n)), batch_size=tr.batch_size, local_epochs=tr.local_epochs,
                  rounds=study.federation.rounds, epsilon=priv.epsilon, delta=priv.delta, accountant=priv.accountant,
                  max_noise_multiplier=priv.max_noise_multiplier, noise_multiplier=priv.noise_multiplier,
                  prior_history=prior)
        for name, n in sizes.items()
    ]


def simulated_train_sizes(study: "StudyConfig") -> dict[str, int]:
    """Each simulated hospital's training-set size, partitioned as the simulation does (npz data:
    the same partition and cap; a DICOM study's sizes are only known to its nodes)."""
    import numpy as np

    from .datasets import npz_source_path
    from .partition import partition_indices

    data, fed = study.data, study.federation
    if data.source != "npz":
        raise PrivacyError("a dry run plans from npz partitions; a DICOM site's size is known only to that site")
    with np.load(npz_source_path(data.path)) as z:
        labels = np.asarray(z["train_labels"]).reshape(-1)
    parts = partition_indices(labels, num_parts=fed.num_hospitals, scheme=data.partition.scheme,
                              alpha=data.partition.alpha, seed=fed.seed, min_per_part=data.partition.min_per_hospital)
    cap = data.max_train_per_hospital
    return {f"hospital-{i + 1}": len(p) if cap is None else min(len(p), cap) for i, p in enumerate(parts)}


def dry_run_lines(study: "StudyConfig") -> list[str]:
    """What ``fedrad simulate --dry-run`` prints: one line per simulated hospital (its plan and
    verdict), then a summary line naming every site whose budget cannot buy useful training."""
    if not study.privacy.enabled:
        return ["privacy disabled: no DP plan (nothing on any site is protected)"]
    plans: list[SitePlan] = []
    lines: list[str] = []
    hopeless: list[str] = []
    for site, n in simulated_train_sizes(study).items():
        try:
            (plan,) = dry_run_plans(study, {site: n})
        except BudgetExceededError as exc:
            lines.append(f"{site}: released size {n}: refused ({exc})")
            hopeless.append(site)
            continue
        plans.append(plan)
        lines.append(plan.line())
        if plan.assessment.verdict == "hopeless":
            hopeless.append(site)
    bad = [p for p in plans if p.assessment.verdict != "ok"]
    if hopeless:
        lines.append(f"refused: {', '.join(hopeless)} would refuse this study (the budget cannot buy useful training)")
    elif bad:
        lines.append(f"warning: {len(bad)} of {len(plans)} sites can expect little learning; raise epsilon or rounds")
    else:
        lines.append(f"all {len(plans)} sites: ok")
    return lines
