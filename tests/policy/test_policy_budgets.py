"""Per-study and lifetime epsilon limits from one ledger: each counts what it should, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.client.ledger import PrivacyLedger
from fedrad.client.node_policy import NodePolicy, check_request
from fedrad.client.privacy import RoundPlan
from fedrad.common.config import parse_study
from fedrad.common.errors import PolicyViolation

STUDY = parse_study({"federation": {"rounds": 10, "min_hospitals": 2}, "privacy": {"epsilon": 4.0},
                     "model": {"name": "cnn"}})
PLAN = RoundPlan(noise_multiplier=1.0, sample_rate=0.05, steps=40)


def _reserve(ledger: PrivacyLedger, study: str, rounds: int) -> None:
    for r in range(1, rounds + 1):
        ledger.reserve(noise_multiplier=PLAN.noise_multiplier, sample_rate=PLAN.sample_rate, steps=PLAN.steps,
                       study=study, round=r)


def test_per_study_limit_counts_only_that_studys_rounds(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=100.0, delta=1e-5)
    _reserve(ledger, "earlier-study", 6)
    assert ledger.spent() > 4.0  # more than the per-study limit was spent, by another study
    policy = NodePolicy(max_epsilon_per_study=4.0, max_epsilon_lifetime=50.0, min_hospitals=2)
    check_request(policy=policy, study=STUDY, study_id="new-study", ledger=ledger, plan=PLAN)  # its own epsilon is small
    rounds = 0
    with pytest.raises(PolicyViolation) as err:
        while rounds < 50:
            check_request(policy=policy, study=STUDY, study_id="new-study", ledger=ledger, plan=PLAN)
            _reserve_one(ledger, "new-study", rounds + 1)
            rounds += 1
    assert err.value.rule == "max_epsilon_per_study" and rounds >= 1
    assert "policy allows 4" in str(err.value)


def _reserve_one(ledger: PrivacyLedger, study: str, rnd: int) -> None:
    ledger.reserve(noise_multiplier=PLAN.noise_multiplier, sample_rate=PLAN.sample_rate, steps=PLAN.steps,
                   study=study, round=rnd)


def test_lifetime_limit_refuses_a_new_study_with_its_own_budget_untouched(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=100.0, delta=1e-5)
    _reserve(ledger, "study-a", 6)
    lifetime = ledger.spent()
    policy = NodePolicy(max_epsilon_per_study=10.0, max_epsilon_lifetime=lifetime + 0.01, min_hospitals=2)
    with pytest.raises(PolicyViolation) as err:  # first round of study B: per-study epsilon tiny, lifetime over
        check_request(policy=policy, study=STUDY, study_id="study-b", ledger=ledger, plan=PLAN)
    assert err.value.rule == "max_epsilon_lifetime"
    assert f"{policy.max_epsilon_lifetime:g}" in str(err.value)
    assert ledger.spent() == lifetime  # the refusal reserved nothing
