"""Issue 10: DP-compatible class weighting. Weights scale each example's *clipped* gradient, so
per-sample clipping (the sensitivity) and the accounting are those of plain DP-SGD; the class
counts the weights come from are a DP release charged once to the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedrad.client.privacy.ledger import CLASS_COUNTS_RELEASE, PrivacyLedger
from fedrad.client.privacy.releases import CLASS_COUNTS_NOISE_MULTIPLIER, balanced_class_weights, released_class_counts
from fedrad.client.runtime import app as client_app
from fedrad.client.training.train import WeightedDPOptimizer
from fedrad.common.errors import LedgerError, PrivacyError
from fedrad.common.privacy import epsilon_for
from tests.adversarial.test_node_kit import message, sim_context, sim_ledger, study

CLIP = 0.1


def _setup(seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = GradSampleModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 1, 4, 4, generator=g) * 10, torch.randint(0, 2, (12,), generator=g)
    return model, x, y


def _summed(model, x, y, weights=None, cls=WeightedDPOptimizer):  # type: ignore[no-untyped-def]
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=CLIP,
              expected_batch_size=len(y))
    if weights is not None:
        opt.sample_weights = weights
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    per_sample = [p.grad_sample.detach().clone() for p in model.parameters()]
    opt.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.reshape(-1) for p in model.parameters()])
    return summed, per_sample


def test_unit_weights_are_exactly_plain_dp_sgd() -> None:
    model, x, y = _setup()
    plain, _ = _summed(model, x, y, cls=DPOptimizer)
    model, x, y = _setup()
    weighted, _ = _summed(model, x, y, weights=torch.ones(len(y)))

    assert torch.allclose(plain, weighted, rtol=0, atol=1e-7)


def test_weights_scale_the_clipped_gradients_and_never_raise_a_contribution_above_the_clip_norm() -> None:
    model, x, y = _setup()
    w = torch.tensor([1.0, 0.25])[y]

    summed, per_sample = _summed(model, x, y, weights=w)

    flat = torch.cat([g.reshape(len(y), -1) for g in per_sample], dim=1)
    clipped = flat * (CLIP / (flat.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    contributions = clipped * w[:, None]
    assert torch.allclose(summed, contributions.sum(0), atol=1e-6)
    assert (contributions.norm(dim=1) <= CLIP * (1 + 1e-5)).all()
    assert (flat.norm(dim=1) > CLIP).sum() >= len(y) // 2  # most were clipped: a loss weight would be undone


def test_weights_above_one_are_refused() -> None:
    model, x, y = _setup()
    with pytest.raises(PrivacyError, match="sensitivity"):
        _summed(model, x, y, weights=torch.full((len(y),), 1.5))


def test_balanced_weights_from_counts() -> None:
    assert balanced_class_weights(counts=[300, 100]) == [pytest.approx(1 / 3), 1.0]
    assert balanced_class_weights(counts=[0, 50]) == [1.0, pytest.approx(1 / 50)]
    assert all(0 < w <= 1 for w in balanced_class_weights(counts=[7, 900, 31]))


def test_class_counts_are_released_once_and_charged(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget_epsilon=8.0, delta=1e-5, dataset_id="d")
    labels = np.array([0] * 200 + [1] * 50)

    first = released_class_counts(ledger=ledger, labels=labels, num_classes=2)
    again = released_class_counts(ledger=ledger, labels=np.array([1] * 1000), num_classes=2)

    assert first == again and all(v >= 0 for v in first)
    assert abs(first[0] - 200) < 120 and abs(first[1] - 50) < 120  # noise std 20
    assert [e["study"] for e in ledger.entries] == [CLASS_COUNTS_RELEASE]
    charge = (CLASS_COUNTS_NOISE_MULTIPLIER, 1.0, 1)
    assert ledger.spent() == pytest.approx(epsilon_for(history=[charge], delta=1e-5), rel=1e-12)
    assert ledger.history_of("any-study") == [charge]  # it belongs to the dataset: every study counts it
    with pytest.raises(LedgerError):
        ledger.release_class_counts(values=[1, 2], noise_multiplier=8.0)


def test_weighting_leaves_the_training_plan_and_its_accounting_unchanged(tmp_path: Path) -> None:
    plain, weighted = study(), study(training={"class_weighting": "balanced"})

    r_plain = client_app.train(message(plain, "train", tmp_path / "a"), sim_context())
    r_weighted = client_app.train(message(weighted, "train", tmp_path / "b"), sim_context())

    assert not r_plain.has_error() and not r_weighted.has_error(), (r_plain.error, r_weighted.error)
    la, lb = sim_ledger(tmp_path / "a"), sim_ledger(tmp_path / "b")
    assert [e["study"] for e in lb["entries"]][:2] == ["<dataset-size>", CLASS_COUNTS_RELEASE]
    ta = [e for e in la["entries"] if not e["study"].startswith("<")]
    tb = [e for e in lb["entries"] if not e["study"].startswith("<")]
    assert [(e["sample_rate"], e["steps"]) for e in ta] == [(e["sample_rate"], e["steps"]) for e in tb] or \
        la["released_size"]["value"] != lb["released_size"]["value"]  # the plan follows the released size only
    # the whole study still fits the study's epsilon, the class-count release included
    mb = r_weighted.content["metrics"]
    assert mb["study_epsilon"] <= weighted.privacy.epsilon * (1 + 1e-9)
    assert mb["epsilon"] == pytest.approx(epsilon_for(
        history=[(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in lb["entries"]], delta=1e-5), rel=1e-9)


def test_weighting_off_keeps_study_fingerprints_and_on_changes_the_study() -> None:
    from fedrad.common.config import parse_study, study_key
    from tests.conftest import small_study_dict

    plain = parse_study(small_study_dict())
    off = parse_study(small_study_dict(training={"class_weighting": "none"}))
    on = parse_study(small_study_dict(training={"class_weighting": "balanced"}))

    assert plain.fingerprint() == off.fingerprint() and study_key(plain) == study_key(off)
    assert study_key(on) != study_key(plain)
    # the study round-trips through its own dict (the wire, config.yaml): "none" is not lost to the default
    assert parse_study(off.to_dict()) == off and parse_study(on.to_dict()) == on
