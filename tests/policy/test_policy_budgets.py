"""Per-study and lifetime epsilon limits from one ledger: each counts what it should, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.client.governance.node_policy import NodePolicy, check_request
from fedrad.client.privacy.budget import RoundPlan, plan_round, reserve_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.common.config import PrivacyConfig, TrainingConfig, parse_study
from fedrad.common.errors import BudgetExceededError, PolicyViolation

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


# ---------------------------------------------------------------- the ledger's own two budgets
def _run_study(ledger: PrivacyLedger, study: str, *, epsilon: float = 8.0, rounds: int = 5) -> None:
    privacy = PrivacyConfig(epsilon=epsilon, delta=1e-5)
    training = TrainingConfig(batch_size=64)
    for rnd in range(1, rounds + 1):
        plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=1000, server_round=rnd,
                          total_rounds=rounds, study_id=study)
        reserve_round(ledger=ledger, plan=plan, study_id=study, server_round=rnd, study_budget=epsilon)


def test_two_studies_on_one_dataset_share_its_lifetime_budget(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, budget_epsilon=10.0, delta=1e-5, dataset_id="d")

    _run_study(ledger, "s1")
    after_s1 = ledger.spent()
    _run_study(ledger, "s2")

    # study 1 had the dataset to itself: its own epsilon was the limit
    assert 7.5 < ledger.spent_by("s1") <= 8.0
    assert after_s1 == pytest.approx(ledger.spent_by("s1"))
    # study 2 asked for 8 too, but only the lifetime budget's remainder was left: more noise
    assert ledger.spent_by("s2") < ledger.spent_by("s1")
    assert 9.5 < ledger.spent() <= 10.0
    # what is left is a sliver: study 3 only gets it under far more noise ...
    s1_noise = max(e["noise_multiplier"] for e in ledger.entries if e["study"] == "s1")
    try:
        _run_study(ledger, "s3")
    except BudgetExceededError:
        pass
    s3_noise = [e["noise_multiplier"] for e in ledger.entries if e["study"] == "s3"]
    assert all(n > 5 * s1_noise for n in s3_noise)
    assert ledger.spent() <= 10.0
    # ... and a study that fixes its own noise is refused outright, with nothing written
    before = path.read_bytes()
    fixed = PrivacyConfig(epsilon=8.0, delta=1e-5, noise_multiplier=s1_noise)
    plan = plan_round(ledger=ledger, privacy=fixed, training=TrainingConfig(batch_size=64), num_examples=1000,
                      server_round=1, total_rounds=5, study_id="s4")
    with pytest.raises(BudgetExceededError, match="lifetime budget of 10"):
        reserve_round(ledger=ledger, plan=plan, study_id="s4", server_round=1, study_budget=8.0)
    assert path.read_bytes() == before


def test_a_study_is_held_to_its_own_epsilon_even_with_lifetime_budget_left(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=100.0, delta=1e-5, dataset_id="d")

    _run_study(ledger, "s1", epsilon=3.0)

    assert 2.8 < ledger.spent_by("s1") <= 3.0  # calibrated to the study's 3, not the dataset's 100
    with pytest.raises(BudgetExceededError, match="study s1's train epsilon"):  # a sixth round at the same noise
        last = ledger.entries[-1]
        ledger.reserve(noise_multiplier=last["noise_multiplier"], sample_rate=last["sample_rate"],
                       steps=last["steps"], study="s1", round=6, study_budget=3.0)
    assert len(ledger.entries) == 5


def test_simulated_site_ledger_is_the_studys_budget_and_a_node_keeps_its_own() -> None:
    from fedrad.client.runtime.site import Site

    study_privacy = PrivacyConfig(epsilon=8.0, delta=1e-5)
    sim = Site(name="h", data=None, ledger_path=Path("l.json"), dataset_id="d")  # type: ignore[arg-type]
    node = Site(name="h", data=None, ledger_path=Path("l.json"), dataset_id="d", budget=(20.0, 1e-5))  # type: ignore[arg-type]

    assert sim.ledger_budget(study_privacy) == (8.0, 1e-5)
    assert node.ledger_budget(study_privacy) == (20.0, 1e-5)  # lifetime: not cut to one study's ask
    # the ledger accounts at the node's own delta; a stricter study is held to its delta per study
    assert node.ledger_budget(PrivacyConfig(epsilon=30.0, delta=1e-6)) == (20.0, 1e-5)
