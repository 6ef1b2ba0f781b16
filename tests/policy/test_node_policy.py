"""Node policy: every rule refuses a request outside it, before anything is spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.client.governance.node_policy import NodePolicy, check_request, load_policy
from fedrad.client.privacy.budget import RoundPlan, plan_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.common.config import parse_study
from fedrad.common.errors import ConfigError, PolicyViolation

POLICY = NodePolicy(max_epsilon_per_study=8, max_epsilon_lifetime=12, max_delta=1e-5, min_noise_multiplier=0.5,
                    max_grad_norm=2.0, max_rounds=20, max_local_epochs=2, allowed_models=("cnn",), min_hospitals=2)


def _study(**over: dict) -> object:
    base = {"federation": {"rounds": 5, "min_hospitals": 2}, "privacy": {"epsilon": 8.0, "delta": 1e-5},
            "model": {"name": "cnn"}, "training": {"batch_size": 64}}
    for section, vals in over.items():
        base.setdefault(section, {}).update(vals)
    return parse_study(base)


def _ledger(tmp_path: Path, name: str = "l.json") -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / name, budget_epsilon=8.0, delta=1e-5, dataset_id="d")


def _plan(study, ledger: PrivacyLedger, rnd: int = 1) -> RoundPlan:  # type: ignore[no-untyped-def]
    return plan_round(ledger=ledger, privacy=study.privacy, training=study.training, num_examples=1000,
                      server_round=rnd, total_rounds=study.federation.rounds)


def test_request_inside_policy_is_accepted(tmp_path: Path) -> None:
    study = _study()
    ledger = _ledger(tmp_path)
    check_request(policy=POLICY, study=study, study_id="s1", ledger=ledger, plan=_plan(study, ledger))


@pytest.mark.parametrize(
    ("rule", "over"),
    [
        ("require_dp", {"privacy": {"enabled": False}}),
        ("max_rounds", {"federation": {"rounds": 50}}),
        ("max_local_epochs", {"training": {"local_epochs": 3}}),
        ("allowed_models", {"model": {"name": "resnet"}}),
        ("min_hospitals", {"federation": {"min_hospitals": 1}}),
        ("max_epsilon_per_study", {"privacy": {"epsilon": 9.0}}),
        ("max_delta", {"privacy": {"delta": 1e-3}}),
        ("max_grad_norm", {"privacy": {"max_grad_norm": 5.0}}),
        ("min_noise_multiplier", {"privacy": {"noise_multiplier": 0.1, "epsilon": 8.0}}),
    ],
)
def test_each_rule_refuses(tmp_path: Path, rule: str, over: dict) -> None:
    study = _study(**over)
    ledger = _ledger(tmp_path)
    plan = _plan(study, ledger) if study.privacy.enabled else None
    with pytest.raises(PolicyViolation) as err:
        check_request(policy=POLICY, study=study, study_id="s1", ledger=ledger, plan=plan)
    assert err.value.rule == rule
    assert f"rule {rule}" in str(err.value)
    assert ledger.spent() == 0.0  # nothing reserved for a refused request


def test_secure_aggregation_required_is_refused(tmp_path: Path) -> None:
    study = _study()
    ledger = _ledger(tmp_path)
    with pytest.raises(PolicyViolation, match="require_secure_aggregation"):
        check_request(policy=POLICY.model_copy(update={"require_secure_aggregation": True}), study=study,
                      study_id="s1", ledger=ledger, plan=_plan(study, ledger))


def test_lifetime_limit_adds_up_across_studies(tmp_path: Path) -> None:
    study = _study()
    policy = POLICY.model_copy(update={"max_epsilon_lifetime": 10.0})
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=100.0, delta=1e-5, dataset_id="d")
    # study 1 spends about 8 over 5 rounds, inside its per-study limit
    for rnd in range(1, 6):
        plan = plan_round(ledger=ledger, privacy=study.privacy, training=study.training, num_examples=1000,
                          server_round=rnd, total_rounds=5, study_id="s1")
        check_request(policy=policy, study=study, study_id="s1", ledger=ledger, plan=plan)
        ledger.reserve(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                       study="s1", round=rnd)
    assert 7.0 < ledger.spent() <= 8.0
    # study 2: its own per-study epsilon stays small, but the dataset's lifetime total would pass 10
    refused = None
    for rnd in range(1, 6):
        plan = plan_round(ledger=ledger, privacy=study.privacy, training=study.training, num_examples=1000,
                          server_round=rnd, total_rounds=5, study_id="s2")
        try:
            check_request(policy=policy, study=study, study_id="s2", ledger=ledger, plan=plan)
        except PolicyViolation as exc:
            refused = (rnd, exc)
            break
        ledger.reserve(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                       study="s2", round=rnd)
    assert refused is not None and refused[1].rule == "max_epsilon_lifetime"
    assert refused[0] > 1  # study 2 did run some rounds: its per-study budget was not the limit
    assert ledger.spent() <= policy.max_epsilon_lifetime


def test_policy_file_errors_name_file_field_and_value(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text("policy:\n  max_rounds: -3\n  allowed_models: [nope]\n  colour: blue\n")
    with pytest.raises(ConfigError) as err:
        load_policy(p)
    text = "\n".join(err.value.problems)
    assert str(p) in text and "max_rounds" in text and "-3" in text and "allowed_models" in text and "colour" in text


def test_policy_version_changes_with_any_rule() -> None:
    assert POLICY.version() != POLICY.model_copy(update={"max_rounds": 21}).version()
    assert POLICY.version() == NodePolicy.model_validate(POLICY.model_dump()).version()
