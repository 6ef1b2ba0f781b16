"""Differential-privacy properties: clipping, noise scale, accounting, calibration, round planning.

In the style of Opacus' own tests: the mechanism is checked by measuring what it does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedrad.client.privacy.budget import plan_round, reserve_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.client.training.train import train_local
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.errors import BudgetExceededError, PrivacyError
from fedrad.common.models import build_model
from fedrad.common.privacy import calibrate_noise, epsilon_for, sample_rate_for, steps_per_epoch

DELTA = 1e-5
TINY = {"widths": [4, 8], "dense": 8, "dropout": 0.0}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=16, options=TINY)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 2, (n,), generator=g)


def _split(n: int, seed: int = 0) -> ImageSplit:
    x, y = _data(n, seed)
    return ImageSplit(images=x.numpy(), labels=y.numpy().astype(np.int64))


def _private(model, n: int, batch: int, *, sigma: float, clip: float, mode: str = "hooks"):
    x, y = _data(n)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode,
    )


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ------------------------------------------------------------------ (a) clipping
@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_per_sample_gradients_are_clipped_to_max_grad_norm(mode: str) -> None:
    clip, batch = 0.5, 8
    module, opt, loader = _private(_model(), 16, batch, sigma=0.0, clip=clip, mode=mode)
    x, y = next(iter(loader))

    loss = 1e4 * F.cross_entropy(module(x), y)  # huge loss: every per-sample gradient is far above the clip norm
    loss.backward()
    params = [p for p in module.parameters() if p.requires_grad]
    raw = torch.stack([p.grad_sample.reshape(batch, -1).norm(dim=1) for p in params], 1).norm(dim=1)
    opt.step()  # clip, accumulate, add (zero) noise, scale by the expected batch size

    assert (raw > 10 * clip).all()
    summed = _flat(p.summed_grad for p in params)
    assert summed.norm() <= batch * clip * (1 + 1e-5)
    mean_grad = _flat(p.grad for p in params)
    assert mean_grad.norm() <= clip * (1 + 1e-5)


def test_single_sample_contribution_equals_clip_norm() -> None:
    clip = 0.25
    module, opt, loader = _private(_model(), 4, 1, sigma=0.0, clip=clip)
    x, y = next(iter(loader))

    (1e4 * F.cross_entropy(module(x), y)).backward()
    opt.step()

    params = [p for p in module.parameters() if p.requires_grad]
    assert _flat(p.grad for p in params).norm().item() == pytest.approx(clip, rel=1e-4)


def test_train_local_update_is_bounded_by_clip_norm_without_noise() -> None:
    """fedrad's own DP path: one full-batch step (q=1), lr 1, no noise -> ||delta w|| <= max_grad_norm."""
    clip, n = 1e-3, 32
    model = _model(1)
    before = _flat(p.detach().clone() for p in model.parameters())
    training = TrainingConfig(batch_size=n, lr=1.0, momentum=0.0, device="cpu")

    stats = train_local(
        model=model, split=_split(n), training=training, augmentation=AugmentationConfig(),
        privacy=PrivacyConfig(max_grad_norm=clip), noise_multiplier=0.0, device=torch.device("cpu"), seed=0,
        sample_rate=1.0, steps=1, expected_batch_size=float(n),
    )

    delta = (_flat(p.detach() for p in model.parameters()) - before).norm().item()
    assert stats.steps == 1
    assert 0 < delta <= clip * (1 + 1e-5)


# ------------------------------------------------------------------ (b) noise scale
def test_noise_std_matches_noise_multiplier_times_clip_over_batch() -> None:
    sigma, clip, batch = 1.3, 0.7, 8
    module, opt, loader = _private(_model(), 32, batch, sigma=sigma, clip=clip)
    x, y = next(iter(loader))
    torch.manual_seed(123)

    (module(x) * 0.0).sum().backward()  # loss independent of the weights: every data gradient is 0
    opt.step()

    g = _flat(p.grad for p in module.parameters() if p.requires_grad)
    expected = sigma * clip / batch
    assert g.numel() > 1000
    assert g.mean().abs().item() < 4 * expected / math.sqrt(g.numel())
    assert g.std().item() == pytest.approx(expected, rel=0.05)


def test_train_local_noise_matches_configuration() -> None:
    """One full-batch DP step through train_local: the update's spread is lr * sigma * C / B."""
    sigma, clip, n, lr = 4.0, 1e-2, 32, 1.0
    model = _model(2)
    before = _flat(p.detach().clone() for p in model.parameters())
    training = TrainingConfig(batch_size=n, lr=lr, momentum=0.0, device="cpu")

    train_local(
        model=model, split=_split(n), training=training, augmentation=AugmentationConfig(),
        privacy=PrivacyConfig(max_grad_norm=clip), noise_multiplier=sigma, device=torch.device("cpu"), seed=5,
        sample_rate=1.0, steps=1, expected_batch_size=float(n),
    )

    delta = _flat(p.detach() for p in model.parameters()) - before
    # data term: norm <= lr*clip (negligible against noise spread over ~1.5k weights)
    assert delta.std().item() == pytest.approx(lr * sigma * clip / n, rel=0.08)


def test_train_local_requires_noise_when_private() -> None:
    with pytest.raises(PrivacyError):
        train_local(
            model=_model(), split=_split(8), training=TrainingConfig(batch_size=4, device="cpu"),
            augmentation=AugmentationConfig(), privacy=PrivacyConfig(), noise_multiplier=None,
            device=torch.device("cpu"), seed=0,
        )


# ------------------------------------------------------------------ (c) accountant reference
#: Opacus 1.6 RDPAccountant, sigma=1.0, q=0.01, 1000 steps, delta=1e-5 (computed once, pinned).
RDP_REFERENCE_EPS = 2.1013652716430564


def test_accountant_matches_pinned_reference() -> None:
    eps = epsilon_for(history=[(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp")

    assert eps == pytest.approx(RDP_REFERENCE_EPS, rel=1e-6)


def test_accountant_agrees_with_opacus_and_composes() -> None:
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)

    assert epsilon_for(history=[(1.1, 0.02, 3)], delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    split_history = [(1.0, 0.01, 400), (1.0, 0.01, 600)]
    assert epsilon_for(history=split_history, delta=1e-5) == pytest.approx(RDP_REFERENCE_EPS, rel=1e-6)


def test_epsilon_edge_cases() -> None:
    assert epsilon_for(history=[], delta=DELTA) == 0.0
    assert epsilon_for(history=[(1.0, 0.1, 0)], delta=DELTA) == 0.0
    assert epsilon_for(history=[(0.0, 0.1, 5)], delta=DELTA) == math.inf
    with pytest.raises(PrivacyError):
        epsilon_for(history=[(1.0, 0.1, 5)], delta=0.0)
    with pytest.raises(PrivacyError):
        epsilon_for(history=[(1.0, 1.5, 5)], delta=DELTA)
    with pytest.raises(PrivacyError):
        epsilon_for(history=[(-1.0, 0.1, 5)], delta=DELTA)


def test_epsilon_monotone_in_noise_and_steps() -> None:
    e = [epsilon_for(history=[(s, 0.05, 100)], delta=DELTA) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert e == sorted(e, reverse=True)
    e = [epsilon_for(history=[(1.0, 0.05, n)], delta=DELTA) for n in (1, 10, 100, 1000)]
    assert e == sorted(e)


# ------------------------------------------------------------------ (d) calibration
@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibrate_noise_fits_target_tightly(target: float) -> None:
    q, steps = 0.05, 200

    sigma = calibrate_noise(prior_history=[], sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)

    eps = epsilon_for(history=[(sigma, q, steps)], delta=DELTA)
    assert eps <= target
    assert eps >= 0.98 * target


def test_calibrate_noise_accounts_for_prior_history() -> None:
    q, steps, target = 0.05, 100, 6.0
    prior = [(1.0, 0.05, 200)]
    spent = epsilon_for(history=prior, delta=DELTA)
    assert 0 < spent < target

    fresh = calibrate_noise(prior_history=[], sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)
    sigma = calibrate_noise(prior_history=prior, sample_rate=q, steps=steps, target_epsilon=target, delta=DELTA)

    total = epsilon_for(history=prior + [(sigma, q, steps)], delta=DELTA)
    assert sigma > fresh  # less budget left -> more noise
    assert total <= target
    assert total >= 0.98 * target


def test_calibrate_noise_refuses_when_budget_spent() -> None:
    prior = [(0.8, 0.1, 1000)]
    assert epsilon_for(history=prior, delta=DELTA) > 5.0

    with pytest.raises(BudgetExceededError, match="already spent"):
        calibrate_noise(prior_history=prior, sample_rate=0.1, steps=10, target_epsilon=5.0, delta=DELTA)


@pytest.mark.parametrize(("n", "b"), [(1, 1), (10, 3), (64, 64), (65, 64), (1000, 7), (400, 100)])
def test_steps_and_sample_rate_match_opacus_poisson_loader(n: int, b: int) -> None:
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b))

    assert steps_per_epoch(num_examples=n, batch_size=b) == len(loader)
    assert sample_rate_for(num_examples=n, batch_size=b) == pytest.approx(loader.sample_rate)


# ------------------------------------------------------------------ (e) round planning
def _ledger(tmp_path: Path, budget: float) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / "ledger.json", budget_epsilon=budget, delta=DELTA, dataset_id="d")


def test_calibrated_plans_fit_budget_over_all_rounds(tmp_path: Path) -> None:
    budget, rounds, n = 4.0, 3, 300
    ledger = _ledger(tmp_path, budget)
    privacy = PrivacyConfig(epsilon=budget)
    training = TrainingConfig(batch_size=32, local_epochs=1)
    eps = [ledger.spent()]

    for r in range(1, rounds + 1):
        plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=n,
                          server_round=r, total_rounds=rounds)
        res = reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=r)
        assert plan.steps == steps_per_epoch(num_examples=n, batch_size=32)
        assert res.epsilon_before == pytest.approx(eps[-1])
        eps.append(ledger.spent())

    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    assert eps[-1] <= budget * (1 + 1e-9)
    assert eps[-1] >= 0.95 * budget  # the budget is used, not wasted


def test_fixed_noise_refused_exactly_at_the_round_that_would_overspend(tmp_path: Path) -> None:
    sigma, n, batch = 1.0, 200, 20
    q, steps = sample_rate_for(num_examples=n, batch_size=batch), steps_per_epoch(num_examples=n, batch_size=batch)
    cumulative = [epsilon_for(history=[(sigma, q, steps)] * r, delta=DELTA) for r in range(1, 8)]
    k = 4  # budget between the cost of 3 and 4 rounds
    budget = (cumulative[k - 2] + cumulative[k - 1]) / 2
    ledger = _ledger(tmp_path, budget)
    privacy = PrivacyConfig(epsilon=budget, noise_multiplier=sigma)
    training = TrainingConfig(batch_size=batch)

    for r in range(1, k):
        plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=n,
                          server_round=r, total_rounds=7)
        reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=r)
        assert ledger.spent() == pytest.approx(cumulative[r - 1], rel=1e-9)
    before = (tmp_path / "ledger.json").read_bytes()
    plan = plan_round(ledger=ledger, privacy=privacy, training=training, num_examples=n,
                      server_round=k, total_rounds=7)

    with pytest.raises(BudgetExceededError):
        reserve_round(ledger=ledger, plan=plan, study_id="s", server_round=k)

    assert (tmp_path / "ledger.json").read_bytes() == before
    assert len(ledger.history) == k - 1


def test_calibrated_plan_refused_once_budget_is_spent(tmp_path: Path) -> None:
    _ledger(tmp_path, 10.0).reserve(noise_multiplier=1.2, sample_rate=0.1, steps=300, study="old", round=1)
    ledger = _ledger(tmp_path, 4.0)  # the site lowered its budget below what is already spent
    assert ledger.spent() > 4.0

    with pytest.raises(BudgetExceededError):
        plan_round(ledger=ledger, privacy=PrivacyConfig(epsilon=4.0), training=TrainingConfig(batch_size=10),
                   num_examples=100, server_round=1, total_rounds=2)


def test_plan_round_rejects_misuse(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, 8.0)
    with pytest.raises(PrivacyError):
        plan_round(ledger=ledger, privacy=PrivacyConfig(enabled=False), training=TrainingConfig(),
                   num_examples=100, server_round=1, total_rounds=2)
    with pytest.raises(PrivacyError):
        plan_round(ledger=ledger, privacy=PrivacyConfig(), training=TrainingConfig(),
                   num_examples=100, server_round=3, total_rounds=2)


# ------------------------------------------------------------------ (f) randomness (issue 9, point 1)
def test_dp_training_never_draws_from_the_global_generator() -> None:
    """Noise, Poisson masks and augmentation come from OS-entropy generators: torch's global
    generator (which a coordinator-known seed could set) is neither read nor advanced."""
    training = TrainingConfig(batch_size=8, lr=0.1, momentum=0.0, device="cpu")
    aug = AugmentationConfig(hflip=0.5, rotate_deg=10.0)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    updates = []
    for _ in range(2):
        torch.set_rng_state(state)  # the same global state before each run
        model = _model(3)
        torch.set_rng_state(state)
        before = _flat(p.detach().clone() for p in model.parameters())
        train_local(model=model, split=_split(32), training=training, augmentation=aug,
                    privacy=PrivacyConfig(max_grad_norm=1.0), noise_multiplier=1.0, device=torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), state)
        updates.append(_flat(p.detach() for p in model.parameters()) - before)

    assert not torch.allclose(updates[0], updates[1])


def test_seeded_training_is_reproducible_only_when_asked() -> None:
    training = TrainingConfig(batch_size=8, lr=0.1, momentum=0.0, device="cpu")

    def run(seed):  # type: ignore[no-untyped-def]
        model = _model(4)
        train_local(model=model, split=_split(32), training=training, augmentation=AugmentationConfig(),
                    privacy=PrivacyConfig(), noise_multiplier=1.0, device=torch.device("cpu"), seed=seed)
        return _flat(p.detach() for p in model.parameters())

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(None), run(None))
