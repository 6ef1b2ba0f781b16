"""The hospital's side of DP: choose the noise for a round and reserve it in the ledger.

The node, not the coordinator, decides the noise: it calibrates so that the remaining planned
rounds fit the budget given everything its ledger already holds, and reserves the round's
steps on disk before training starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedrad.common.config import PrivacyConfig, TrainingConfig
from fedrad.common.errors import BudgetExceededError, PrivacyError
from fedrad.common.privacy import calibrate_noise, sample_rate_for, steps_per_epoch

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
) -> RoundPlan:
    """Noise multiplier, sampling rate and step count for this round (nothing is written)."""
    if not privacy.enabled:
        raise PrivacyError("plan_round called for a study without DP")
    if not 1 <= server_round <= total_rounds:
        raise PrivacyError(f"round {server_round} outside 1..{total_rounds}")
    q = sample_rate_for(num_examples=num_examples, batch_size=training.batch_size)
    steps = steps_per_epoch(num_examples=num_examples, batch_size=training.batch_size) * training.local_epochs
    if privacy.noise_multiplier is not None:
        return RoundPlan(privacy.noise_multiplier, q, steps)
    remaining_rounds = total_rounds - server_round + 1
    sigma = calibrate_noise(
        prior_history=ledger.history,
        sample_rate=q,
        steps=steps * remaining_rounds,
        target_epsilon=ledger.budget,
        delta=ledger.delta,
        accountant=ledger.accountant,
        max_noise_multiplier=privacy.max_noise_multiplier,
    )
    return RoundPlan(sigma, q, steps)


def reserve_round(
    *,
    ledger: PrivacyLedger,
    plan: RoundPlan,
    study_id: str,
    server_round: int,
) -> Reservation:
    """Write the round's privacy cost to the ledger; raises BudgetExceededError to refuse."""
    try:
        return ledger.reserve(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            study=study_id,
            round=server_round,
        )
    except BudgetExceededError:
        log.warning("round %d refused: privacy budget", server_round)
        raise
