"""The hospital's side of DP: choose the noise for a round and reserve it in the ledger.

The node, not the coordinator, decides the noise: it calibrates so that the remaining planned
rounds fit both budgets given everything its ledger already holds (the dataset's lifetime
budget over every study, and the study's own epsilon over this study's work), and reserves the
round's steps on disk before training starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedrad.common.config import PrivacyConfig, TrainingConfig
from fedrad.common.errors import BudgetExceededError, PrivacyError
from fedrad.common.privacy import HistoryEntry, calibrate_noise, sample_rate_for, steps_per_epoch

from .ledger import PrivacyLedger, Reservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_round(
    *,
    ledger: PrivacyLedger,
    privacy: PrivacyConfig,
    training: TrainingConfig,
    num_examples: int,
    server_round: int,
    total_rounds: int,
    study_id: str | None = None,
) -> RoundPlan:
    """Noise multiplier, sampling rate and step count for this round (nothing is written).

    With ``study_id`` the noise is the larger of two calibrations: this study's work (its ledger
    entries plus its remaining rounds) within ``privacy.epsilon``, and the dataset's whole history
    plus those rounds within the ledger's lifetime budget. Without it, one calibration over the
    whole history within the stricter of the two.
    """
    if not privacy.enabled:
        raise PrivacyError("plan_round called for a study without DP")
    if not 1 <= server_round <= total_rounds:
        raise PrivacyError(f"round {server_round} outside 1..{total_rounds}")
    q = sample_rate_for(num_examples=num_examples, batch_size=training.batch_size)
    steps = steps_per_epoch(num_examples=num_examples, batch_size=training.batch_size) * training.local_epochs
    if privacy.noise_multiplier is not None:
        return RoundPlan(privacy.noise_multiplier, q, steps)
    remaining_rounds = total_rounds - server_round + 1

    def calibrate(prior: list[HistoryEntry], target: float) -> float:
        return calibrate_noise(
            prior_history=prior,
            sample_rate=q,
            steps=steps * remaining_rounds,
            target_epsilon=target,
            delta=ledger.delta,
            accountant=ledger.accountant,
            max_noise_multiplier=privacy.max_noise_multiplier,
        )

    lifetime = ledger.history
    if study_id is None:  # one budget: the stricter of the ledger's and the study's, over everything
        return RoundPlan(calibrate(lifetime, min(ledger.budget, privacy.epsilon)), q, steps)
    own = ledger.history_of(study_id)
    sigma = calibrate(own, privacy.epsilon)
    if own != lifetime or ledger.budget < privacy.epsilon:  # other studies used this dataset too
        sigma = max(sigma, calibrate(lifetime, ledger.budget))
    return RoundPlan(sigma, q, steps)


def reserve_round(
    *,
    ledger: PrivacyLedger,
    plan: RoundPlan,
    study_id: str,
    server_round: int,
    study_budget: float | None = None,
) -> Reservation:
    """Write the round's privacy cost to the ledger; raises BudgetExceededError to refuse.

    ``study_budget``: the study's own epsilon, refused beyond (the lifetime budget always applies).
    """
    try:
        return ledger.reserve(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            study=study_id,
            round=server_round,
            study_budget=study_budget,
        )
    except BudgetExceededError:
        log.warning("round %d refused: privacy budget", server_round)
        raise
