"""Issue 9, point 9 (node side): exact step accounting, the empty Poisson batch, every failure
audited, and delta no longer fixed for ever by the first study.

Before: the ledger reserved ``ceil(N/B)`` steps while Opacus' sampler took ``int(1/q)``, so for
some sizes (N=5952, B=64) every round was charged and then failed; an empty Poisson batch
crashed the round; a ``RuntimeError`` in training skipped the audit; a later study with another
delta was refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.privacy.budget import plan_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.client.runtime import app as client_app
from fedrad.client.training.train import train_local
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig, study_key
from fedrad.common.datasets import ImageSplit
from fedrad.common.privacy import epsilon_for
from fedrad.common.protocol import ERR_REFUSED
from tests.adversarial.test_node_kit import deployed_node, message, sim_context, study

CPU = torch.device("cpu")


def _split(n: int, side: int = 2) -> ImageSplit:
    rng = np.random.default_rng(n)
    return ImageSplit(images=rng.random((n, 1, side, side), dtype=np.float32),
                      labels=rng.integers(0, 2, n).astype(np.int64))


def _linear(side: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 2))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


@pytest.mark.parametrize(("n", "b"), [(1, 1), (7, 16), (63, 64), (64, 64), (65, 64), (127, 16), (1000, 64),
                                      (1023, 100), (4097, 128), (5952, 64), (5952, 100), (9999, 333)])
def test_the_plan_reserves_exactly_the_steps_the_loop_takes(tmp_path: Path, n: int, b: int) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=1e6, delta=1e-5, dataset_id="d")
    training = TrainingConfig(batch_size=b, lr=0.01, momentum=0.0, device="cpu")
    privacy = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=n, server_round=1,
                      total_rounds=1)
    ledger.reserve(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                   study="s", round=1)

    stats = train_local(model=_linear(), split=_split(n), training=training, augmentation=AugmentationConfig(),
                        privacy=privacy, noise_multiplier=plan.noise_multiplier, device=CPU,
                        sample_rate=plan.sample_rate, steps=plan.steps, expected_batch_size=plan.expected_batch_size)

    assert stats.steps == plan.steps == ledger.history[-1][2] == max(math.ceil(n / b), 4)  # q <= 1/4 on every site
    assert plan.expected_batch_size == pytest.approx(plan.sample_rate * n)


def test_an_empty_poisson_batch_takes_its_pure_noise_step() -> None:
    n, sigma, clip, lr, ebs = 32, 2.0, 0.5, 1.0, 8.0
    training = TrainingConfig(batch_size=8, lr=lr, momentum=0.0, device="cpu")
    split = _split(n, side=16)
    model = _linear(16)
    before = _flat(model)

    stats = train_local(model=model, split=split, training=training, augmentation=AugmentationConfig(),
                        privacy=PrivacyConfig(max_grad_norm=clip), noise_multiplier=sigma, device=CPU,
                        sample_rate=1e-12, steps=3, expected_batch_size=ebs)  # every batch is empty

    delta = _flat(model) - before
    assert stats.steps == 3  # the step count matches what was reserved
    # noise only: three steps of N(0, (lr * sigma * clip / ebs)^2) per weight
    assert delta.std().item() == pytest.approx(math.sqrt(3) * lr * sigma * clip / ebs, rel=0.15)
    quiet = _linear(16)
    q_before = _flat(quiet)
    train_local(model=quiet, split=split, training=training, augmentation=AugmentationConfig(),
                privacy=PrivacyConfig(max_grad_norm=clip), noise_multiplier=0.0, device=CPU,
                sample_rate=1e-12, steps=3, expected_batch_size=ebs)
    assert torch.equal(_flat(quiet), q_before)  # without noise an empty step moves nothing: no data enters


def test_a_node_side_failure_is_audited_and_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_kw: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access (patient 123 in the message)")

    monkeypatch.setattr(client_app, "train_local", broken)

    reply = client_app.train(message(study(), "train", tmp_path), sim_context())

    assert reply.has_error() and reply.error.code == ERR_REFUSED == 4000
    assert "RuntimeError" in reply.error.reason and "patient" not in reply.error.reason  # no free text leaves
    (entry,) = AuditLog(tmp_path / "hospital-1" / "audit.jsonl").entries()
    assert entry["outcome"] == "failed: RuntimeError" and entry["arrays"] == []


def test_studies_with_other_deltas_share_one_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployed node's ledger accounts at node.yaml's delta; a study with another delta is not
    refused, and a stricter study's own epsilon is evaluated at its smaller delta."""
    node_yaml, ctx = deployed_node(tmp_path, monkeypatch, privacy={"epsilon": 20.0, "delta": 1e-5})
    usual = study(privacy={"enabled": True, "epsilon": 6.0, "delta": 1e-5})
    strict = study(privacy={"enabled": True, "epsilon": 6.0, "delta": 1e-7}, training={"lr": 0.02})

    first = client_app.train(message(usual, "train", None), ctx)
    second = client_app.train(message(strict, "train", None), ctx)

    assert not first.has_error() and not second.has_error(), (first.error, second.error)
    led = PrivacyLedger.load(node_yaml.parent / "state" / "privacy-ledger.json")
    assert led.delta == 1e-5  # the node's, whatever the studies asked
    own = led.history_of(study_key(strict))
    assert second.content["metrics"]["study_epsilon"] == pytest.approx(epsilon_for(history=own, delta=1e-7), rel=1e-9)
    assert second.content["metrics"]["study_epsilon"] > epsilon_for(history=own, delta=1e-5)
    assert second.content["metrics"]["delta"] == 1e-5
