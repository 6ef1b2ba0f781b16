"""The hospital's side of DP: choose the noise for a round or an evaluation and reserve it in the ledger.

The node, not the coordinator, decides the noise: it calibrates so that the study's remaining
planned rounds (from the node's own record of the study) fit both budgets given everything its
ledger already holds (the dataset's lifetime budget over every study, and the study's own
epsilon over this study's work), and reserves the round's steps on disk before training starts.

Everything the plan depends on is data-independent given the ledger: the training set's size
enters only as its DP-released value (:func:`fedrad.client.privacy.releases.released_size`), released once per dataset.

Evaluations are planned the same way on the ledger's separate ``val`` account: the study's
planned evaluations (its rounds + 1, or fewer where node.yaml says so) share the study's epsilon,
each one a Gaussian mechanism over the score histograms (q = 1, one step). Training and
validation splits hold disjoint examples, so by parallel composition a patient's guarantee is the
larger of the two accounts' epsilons, not their sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedrad.client.privacy.ledger import Account, PrivacyLedger, Reservation, StudyTurn
from fedrad.common.config import PrivacyConfig, TrainingConfig
from fedrad.common.errors import BudgetExceededError, PrivacyError
from fedrad.common.planning import Assessment, assess, sampling_plan
from fedrad.common.privacy import HistoryEntry, calibrate_noise

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    #: The DP optimiser's divisor: sample rate x released size (data-independent). 0 for evaluations.
    expected_batch_size: float = 0.0
    #: Whether the plan can be expected to learn (training plans only; see fedrad.common.planning).
    assessment: Assessment | None = None

    def record(self) -> dict[str, float | str]:
        """The plan as the ledger entry records it (data-independent numbers only)."""
        out: dict[str, float | str] = {"expected_batch_size": float(self.expected_batch_size)}
        if self.assessment is not None:
            out.update(verdict=self.assessment.verdict, noise_per_example=float(self.assessment.noise_per_example))
        return out


def plan_round(
    *,
    ledger: PrivacyLedger,
    privacy: PrivacyConfig,
    training: TrainingConfig,
    num_examples: int,
    server_round: int,
    total_rounds: int,
    study_id: str | None = None,
    study_delta: float | None = None,
    site: str = "this site",
) -> RoundPlan:
    """Noise multiplier, sampling rate and step count for this round (nothing is written).

    Sampling follows :func:`fedrad.common.planning.sampling_plan` (q <= 1/4 and at least 4 steps per
    round and local epoch on every site); the plan carries its usefulness assessment (see
    :func:`check_useful`).

    ``num_examples``: the training set's *released* size; ``server_round`` / ``total_rounds``: the
    node's own round of the study and the study's planned rounds (never the coordinator's word).
    With ``study_id`` the noise is the larger of two calibrations: this study's work (its ledger
    entries plus its remaining rounds) within ``privacy.epsilon`` (at ``study_delta``, default the
    ledger's), and the dataset's whole history plus those rounds within the ledger's lifetime
    budget. Without it, one calibration over the whole history within the stricter of the two.
    """
    if not privacy.enabled:
        raise PrivacyError("plan_round called for a study without DP")
    if not 1 <= server_round <= total_rounds:
        raise PrivacyError(f"round {server_round} outside 1..{total_rounds}")
    s = sampling_plan(num_examples=num_examples, batch_size=training.batch_size, local_epochs=training.local_epochs)
    q, steps, expected = s.sample_rate, s.steps, s.expected_batch_size
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        remaining_rounds = total_rounds - server_round + 1
        sigma = _calibrate(ledger=ledger, privacy=privacy, study_id=study_id, study_delta=study_delta,
                           account="train", sample_rate=q, steps=steps * remaining_rounds)
    verdict = assess(noise_multiplier=sigma, expected_batch_size=expected, site=site)
    return RoundPlan(sigma, q, steps, expected, verdict)


def check_useful(plan: RoundPlan, *, site: str, server_round: int, total_rounds: int) -> None:
    """Refuse a hopeless plan (before anything is reserved); log a marginal one. Every plan is logged."""
    a = plan.assessment
    log.info("%s plan round %d/%d: q %.4f (expected batch %.1f), %d steps, noise multiplier %.4f, noise/example "
             "%.4f: %s", site, server_round, total_rounds, plan.sample_rate, plan.expected_batch_size, plan.steps,
             plan.noise_multiplier, a.noise_per_example if a else float("nan"), a.verdict if a else "-")
    if a is None or a.verdict == "ok":
        return
    if a.verdict == "hopeless":
        raise BudgetExceededError(a.message)
    log.warning("%s", a.message)


def plan_evaluation(
    *,
    ledger: PrivacyLedger,
    privacy: PrivacyConfig,
    evaluation: int,
    planned_evaluations: int,
    study_id: str,
    study_delta: float | None = None,
    planned_rounds: int | None = None,
    rounds_trained: int | None = None,
) -> RoundPlan:
    """Noise multiplier of the node's ``evaluation``-th histogram release for a study (nothing is
    written): its remaining planned evaluations, each a Gaussian mechanism (q = 1, one step), fit
    the study's epsilon and the lifetime budget on the ``val`` account.

    With ``planned_rounds`` and ``rounds_trained`` (the node's own record), the evaluation after
    the node's last training round (the one the coordinator's operating threshold and final
    validation figures come from) gets :data:`FINAL_EVALUATION_SHARE` of the study's validation
    budget: it is planned as ``m = planned_rounds - 1`` units, a Gaussian mechanism of noise
    ``sigma / sqrt(m)`` whose RDP is exactly that of ``m`` releases at ``sigma`` (RDP of the
    Gaussian mechanism is linear in 1 / sigma^2), and every earlier evaluation is calibrated so that
    it, the earlier ones still to come and those ``m`` units fit. Without them: equal shares.
    """
    if not privacy.enabled:
        raise PrivacyError("plan_evaluation called for a study without DP")
    if not 1 <= evaluation <= planned_evaluations:
        raise PrivacyError(f"evaluation {evaluation} outside 1..{planned_evaluations}")
    remaining = planned_evaluations - evaluation + 1

    def calibrate(steps: int) -> float:
        return _calibrate(ledger=ledger, privacy=privacy, study_id=study_id, study_delta=study_delta, account="val",
                          sample_rate=1.0, steps=steps)

    if planned_rounds is None or rounds_trained is None:
        return RoundPlan(calibrate(remaining), 1.0, 1, 0.0)
    units = final_evaluation_units(planned_rounds)
    if rounds_trained >= planned_rounds or remaining == 1:  # the final evaluation
        return RoundPlan(calibrate(units) / math.sqrt(units), 1.0, 1, 0.0)
    others = max(0, min(planned_rounds - 1 - rounds_trained, remaining - 2))
    return RoundPlan(calibrate(1 + others + units), 1.0, 1, 0.0)


#: Share of a study's validation budget kept for the evaluation after the node's last training round.
FINAL_EVALUATION_SHARE = 0.5


def final_evaluation_units(planned_rounds: int) -> int:
    """How many equal-noise releases the final evaluation's budget is worth: as many as all the
    earlier evaluations together (:data:`FINAL_EVALUATION_SHARE` = 1/2), at least 1."""
    return max(1, round((planned_rounds - 1) * FINAL_EVALUATION_SHARE / (1 - FINAL_EVALUATION_SHARE)))


def _calibrate(*, ledger: PrivacyLedger, privacy: PrivacyConfig, study_id: str | None, study_delta: float | None,
               account: Account, sample_rate: float, steps: int) -> float:
    def calibrate(prior: list[HistoryEntry], target: float, delta: float) -> float:
        return calibrate_noise(
            prior_history=prior, sample_rate=sample_rate, steps=steps, target_epsilon=target, delta=delta,
            accountant=ledger.accountant, max_noise_multiplier=privacy.max_noise_multiplier,
        )

    lifetime = ledger.history_in(account)
    if study_id is None:  # one budget: the stricter of the ledger's and the study's, over everything
        return calibrate(lifetime, min(ledger.budget, privacy.epsilon), min(ledger.delta, study_delta or 1.0))
    own = ledger.history_of(study_id, account)
    sigma = calibrate(own, privacy.epsilon, study_delta or ledger.delta)
    if own != lifetime or ledger.budget < privacy.epsilon:  # other studies used this dataset too
        sigma = max(sigma, calibrate(lifetime, ledger.budget, ledger.delta))
    return sigma


def study_delta(*, ledger: PrivacyLedger, privacy: PrivacyConfig) -> float:
    """The delta a study's own epsilon is evaluated at: the smaller of the study's and the node's.

    A study asking for a larger delta than the node's is held to the node's (stricter); one asking
    for a smaller delta gets it (a history of subsampled-Gaussian steps can be evaluated soundly at
    any delta). The dataset's lifetime budget is always at the node's delta.
    """
    return min(privacy.delta, ledger.delta)


def reserve_round(
    *,
    ledger: PrivacyLedger,
    plan: RoundPlan,
    study_id: str,
    server_round: int,
    study_budget: float | None = None,
    account: Account = "train",
    study_delta: float | None = None,
    turn: StudyTurn | None = None,
) -> Reservation:
    """Write the round's (or evaluation's) privacy cost to the ledger; raises BudgetExceededError to refuse.

    ``study_budget``: the study's own epsilon, refused beyond (the lifetime budget always applies).
    ``turn``: count the study's round/evaluation in the same atomic write.
    """
    try:
        return ledger.reserve(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            study=study_id,
            round=server_round,
            study_budget=study_budget,
            account=account,
            study_delta=study_delta,
            turn=turn,
            plan=plan.record() if account == "train" else None,
        )
    except BudgetExceededError:
        log.warning("%s %d refused: privacy budget", "evaluation" if account == "val" else "round", server_round)
        raise
