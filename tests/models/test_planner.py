"""Issue 10: every site plans real subsampling and enough noisy steps within both budgets, and a
budget that cannot buy useful training is refused (hopeless) or flagged (marginal) before work."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedrad.client.privacy.budget import check_useful, plan_round, reserve_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.client.privacy.releases import SIZE_NOISE_MULTIPLIER, released_size
from fedrad.client.runtime import app as client_app
from fedrad.common.config import PrivacyConfig, TrainingConfig, parse_study
from fedrad.common.errors import BudgetExceededError
from fedrad.common.planning import (
    HOPELESS_NOISE_PER_EXAMPLE,
    MARGINAL_NOISE_PER_EXAMPLE,
    MAX_SAMPLE_RATE,
    MIN_BATCHES_PER_EPOCH,
    assess,
    dry_run_plans,
    sampling_plan,
)
from fedrad.common.protocol import ERR_BUDGET
from tests.adversarial.test_node_kit import message, sim_context, sim_ledger, study
from tests.conftest import small_study_dict

DELTA = 1e-5


def _ledger(tmp_path: Path, budget: float) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / "ledger.json", budget_epsilon=budget, delta=DELTA, dataset_id="d")


@pytest.mark.parametrize(("n", "batch"), [(1, 128), (60, 128), (128, 128), (300, 128), (511, 128)])
def test_small_sites_get_real_subsampling_and_a_floor_of_steps(n: int, batch: int) -> None:
    s = sampling_plan(num_examples=n, batch_size=batch, local_epochs=2)

    assert s.sample_rate <= MAX_SAMPLE_RATE < 1
    assert s.steps >= MIN_BATCHES_PER_EPOCH * 2
    assert s.steps == round(2 / s.sample_rate)
    assert s.expected_batch_size == pytest.approx(s.sample_rate * n)


@pytest.mark.parametrize(("n", "batch"), [(512, 128), (1500, 128), (4708, 64), (9999, 333)])
def test_large_sites_keep_the_opacus_plan_for_their_batch_size(n: int, batch: int) -> None:
    s = sampling_plan(num_examples=n, batch_size=batch, local_epochs=1)

    assert s.steps == math.ceil(n / batch)
    assert s.sample_rate == pytest.approx(1 / math.ceil(n / batch))
    assert s.sample_rate < MAX_SAMPLE_RATE or s.steps == MIN_BATCHES_PER_EPOCH


@pytest.mark.parametrize(("n", "epsilon", "rounds"), [(90, 8.0, 5), (1500, 1.0, 4)])
def test_the_whole_study_fits_the_budget_to_the_last_digit_against_opacus(
        tmp_path: Path, n: int, epsilon: float, rounds: int) -> None:
    ledger = _ledger(tmp_path, epsilon)
    n_rel = released_size(ledger=ledger, true_size=n)
    privacy, training = PrivacyConfig(epsilon=epsilon, delta=DELTA), TrainingConfig(batch_size=128)

    for r in range(1, rounds + 1):
        plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=n_rel, server_round=r,
                          total_rounds=rounds, study_id="s", study_delta=DELTA)
        assert plan.sample_rate <= MAX_SAMPLE_RATE and plan.steps >= MIN_BATCHES_PER_EPOCH
        reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=r, study_budget=epsilon)

    acc = RDPAccountant()
    acc.history = [(SIZE_NOISE_MULTIPLIER, 1.0, 1)] + [(e["noise_multiplier"], e["sample_rate"], e["steps"])
                                                       for e in ledger.entries if e["study"] == "s"]
    opacus_eps = acc.get_epsilon(delta=DELTA)
    assert ledger.spent() == pytest.approx(opacus_eps, rel=1e-12)
    assert opacus_eps <= epsilon * (1 + 1e-9)
    assert opacus_eps >= 0.99 * epsilon  # the budget buys training, not waste
    assert all(e["plan"]["verdict"] in ("ok", "marginal") for e in ledger.entries if e["study"] == "s")


def test_the_lifetime_budget_binds_when_it_is_the_smaller(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, 3.0)
    ledger.reserve(noise_multiplier=2.0, sample_rate=0.1, steps=50, study="earlier", round=1)
    privacy, training = PrivacyConfig(epsilon=8.0, delta=DELTA), TrainingConfig(batch_size=64)

    for r in (1, 2):
        plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=200, server_round=r,
                          total_rounds=2, study_id="s", study_delta=DELTA)
        reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=r, study_budget=8.0)

    assert 0.99 * 3.0 <= ledger.spent() <= 3.0 * (1 + 1e-9)


def test_assessment_thresholds() -> None:
    assert assess(noise_multiplier=1.0, expected_batch_size=125.0).verdict == "ok"
    marginal = assess(noise_multiplier=(MARGINAL_NOISE_PER_EXAMPLE * 1.2) * 100, expected_batch_size=100.0,
                      site="hospital-1")
    assert marginal.verdict == "marginal" and "hospital-1" in marginal.message and "raise epsilon" in marginal.message
    assert assess(noise_multiplier=HOPELESS_NOISE_PER_EXAMPLE * 1.1 * 20, expected_batch_size=20.0).verdict == "hopeless"
    assert assess(noise_multiplier=30.0, expected_batch_size=1e4).verdict == "hopeless"


def test_marginal_plan_is_logged_and_hopeless_plan_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = _ledger(tmp_path, 100.0)
    training = TrainingConfig(batch_size=16)
    marginal = plan_round(ledger=ledger, privacy=PrivacyConfig(epsilon=1.0, noise_multiplier=1.5),
                          training=training, num_examples=64, server_round=1, total_rounds=1, site="hospital-2")
    hopeless = plan_round(ledger=ledger, privacy=PrivacyConfig(epsilon=1.0, noise_multiplier=12.0),
                          training=training, num_examples=64, server_round=1, total_rounds=1, site="hospital-2")

    with caplog.at_level(logging.WARNING):
        check_useful(marginal, site="hospital-2", server_round=1, total_rounds=1)
    with pytest.raises(BudgetExceededError, match="cannot buy useful training"):
        check_useful(hopeless, site="hospital-2", server_round=1, total_rounds=1)

    assert any("expect little learning" in r.getMessage() for r in caplog.records)


def test_node_refuses_a_hopeless_study_before_reserving_any_step(tmp_path: Path) -> None:
    s = study(privacy={"epsilon": 0.6}, federation={"rounds": 20})

    reply = client_app.train(message(s, "train", tmp_path), sim_context())

    assert reply.has_error() and reply.error.code == ERR_BUDGET
    assert "cannot buy useful training" in reply.error.reason and "raise epsilon" in reply.error.reason
    ledger = sim_ledger(tmp_path)
    assert [e["study"] for e in ledger["entries"]] == ["<dataset-size>"]  # only the one-off size release
    assert all(rec["train_rounds"] == 0 for rec in ledger["studies"].values())


def test_dry_run_plans_every_site() -> None:
    s = parse_study(small_study_dict(privacy={"epsilon": 1.0}, federation={"rounds": 10}, training={"batch_size": 128}))

    plans = dry_run_plans(s, {"hospital-1": 40, "hospital-2": 1500})

    assert [p.site for p in plans] == ["hospital-1", "hospital-2"]
    assert all(p.sample_rate <= MAX_SAMPLE_RATE for p in plans)
    assert all(p.expected_epsilon <= 1.0 * (1 + 1e-9) for p in plans)
    assert plans[0].assessment.verdict == "hopeless" and "hospital-1" in plans[0].line()
    assert plans[1].assessment.verdict == "ok" and "noise multiplier" in plans[1].line()


def test_dry_run_lines_for_the_demo_and_a_starved_budget() -> None:
    from fedrad import bundled_path
    from fedrad.common.config import load_study
    from fedrad.common.planning import dry_run_lines

    demo = load_study(bundled_path("configs", "demo.yaml"))
    starved = demo.model_copy(update={"privacy": demo.privacy.model_copy(update={"epsilon": 0.3})})

    ok, bad = dry_run_lines(demo), dry_run_lines(starved)

    assert len(ok) == demo.federation.num_hospitals + 1 and ok[-1] == "all 3 sites: ok"
    assert all("noise multiplier" in line and "q 0." in line for line in ok[:-1])
    assert bad[-1].startswith("refused:") and "hospital-1" in bad[-1]


def test_the_final_evaluation_gets_half_the_validation_budget_and_the_study_fits_it(tmp_path: Path) -> None:
    from fedrad.client.privacy.budget import plan_evaluation

    rounds, epsilon = 10, 1.0
    ledger = _ledger(tmp_path, epsilon)
    privacy = PrivacyConfig(epsilon=epsilon, delta=DELTA)
    sigmas = []
    for k in range(1, rounds + 1):  # one evaluation after each training round, as the coordinator asks
        plan = plan_evaluation(ledger=ledger, privacy=privacy, evaluation=k, planned_evaluations=rounds + 1,
                               study_id="s", study_delta=DELTA, planned_rounds=rounds, rounds_trained=k)
        reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=k, study_budget=epsilon, account="val")
        sigmas.append(plan.noise_multiplier)

    spent = ledger.spent("val")
    assert spent <= epsilon * (1 + 1e-9) and spent >= 0.99 * epsilon
    acc = RDPAccountant()
    acc.history = [(s, 1.0, 1) for s in sigmas]
    assert acc.get_epsilon(delta=DELTA) == pytest.approx(spent, rel=1e-12)
    assert max(sigmas[:-1]) == pytest.approx(min(sigmas[:-1]), rel=2e-3)  # equal noise for monitoring
    assert sigmas[-1] < sigmas[0] / 2.5  # the final one (threshold and final figures) is much less noisy
    with pytest.raises(BudgetExceededError):  # nothing is left for an 11th release
        plan_evaluation(ledger=ledger, privacy=privacy, evaluation=rounds + 1, planned_evaluations=rounds + 1,
                        study_id="s", study_delta=DELTA, planned_rounds=rounds, rounds_trained=rounds)
