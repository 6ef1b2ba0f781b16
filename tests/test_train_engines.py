"""train_local with fedrad's DP engines (issue 14) and augmentation multiplicity (issue 10).

The same seeded plan (Poisson masks, augmentations, noise: seeded in the test only; a node seeds
from OS entropy) through each engine must end at the same weights as Opacus' ``ew`` to float
rounding, with class weights and with K augmented views per example.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrad.client.training.train import train_local
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.models import build_model

TINY = {"widths": [4, 8], "dense": 8, "dropout": 0.0}
AUG = AugmentationConfig(hflip=0.5, rotate_deg=10.0, brightness=0.1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=16, options=TINY)


def _split(n: int, seed: int = 0) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 2, (n,), generator=g)
    return ImageSplit(images=x.numpy(), labels=y.numpy().astype(np.int64))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(mode: str, *, views: int = 1, aug: AugmentationConfig = AUG, weights: list[float] | None = None,
           seed: int | None = 3, sample_rate: float = 0.3, steps: int = 4, sigma: float = 0.8) -> torch.Tensor:
    model = _model()
    training = TrainingConfig(batch_size=8, lr=0.5, momentum=0.9, device="cpu", augmentation_multiplicity=views)
    stats = train_local(model=model, split=_split(32), training=training, augmentation=aug,
                        privacy=PrivacyConfig(max_grad_norm=0.05, grad_sample_mode=mode),  # type: ignore[arg-type]
                        noise_multiplier=sigma, device=torch.device("cpu"), seed=seed, sample_rate=sample_rate,
                        steps=steps, expected_batch_size=9.6, class_weights=weights)
    assert stats.steps == steps
    assert all(getattr(p, "summed_grad", None) is None and getattr(p, "grad_sample", None) is None
               for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    return _flat(model)


@pytest.mark.parametrize("mode", ["mixed", "ghost", "per-sample"])
@pytest.mark.parametrize(("views", "weights"), [(1, None), (1, [0.4, 1.0]), (3, [1.0, 0.6])])
def test_engines_end_at_opacus_ew_weights(mode: str, views: int, weights: list[float] | None) -> None:
    # arrange
    start = _flat(_model())
    # act
    want = _train("ew", views=views, weights=weights)
    got = _train(mode, views=views, weights=weights)
    # assert: the same noisy, clipped, weighted updates (and they did move the model)
    assert float((want - start).norm()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)


def test_more_views_change_the_update_and_views_without_augmentation_are_one_view() -> None:
    # act
    one, three = _train("mixed", views=1), _train("mixed", views=3)
    plain_one = _train("mixed", views=1, aug=AugmentationConfig())
    plain_four = _train("mixed", views=4, aug=AugmentationConfig())
    # assert
    assert not torch.allclose(one, three)
    assert torch.equal(plain_one, plain_four)


@pytest.mark.parametrize("mode", ["mixed", "ew"])
def test_empty_poisson_batches_still_take_their_noise_step(mode: str) -> None:
    # arrange: sample rate so small that every batch is empty (32 examples, q = 1e-9)
    start = _flat(_model())
    # act
    quiet = _train(mode, sample_rate=1e-9, steps=3, sigma=0.0)
    noisy = _train(mode, sample_rate=1e-9, steps=3, sigma=1.0)
    # assert: nothing moves without noise; with noise every step moved the weights
    assert torch.equal(quiet, start)
    assert float((noisy - start).abs().min()) > 0


def test_engine_with_views_draws_nothing_from_the_global_generator() -> None:
    training = TrainingConfig(batch_size=8, lr=0.5, momentum=0.0, device="cpu", augmentation_multiplicity=2)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    updates = []
    for _ in range(2):
        model = _model()
        before = _flat(model)
        torch.set_rng_state(state)
        train_local(model=model, split=_split(32), training=training, augmentation=AUG,
                    privacy=PrivacyConfig(max_grad_norm=1.0, grad_sample_mode="mixed"), noise_multiplier=1.0,
                    device=torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), state)
        updates.append(_flat(model) - before)
    assert not torch.allclose(updates[0], updates[1])  # OS entropy: two runs differ


def test_views_in_plain_training() -> None:
    model = _model()
    before = _flat(model)
    training = TrainingConfig(batch_size=8, lr=0.1, momentum=0.0, device="cpu", augmentation_multiplicity=3)
    stats = train_local(model=model, split=_split(24), training=training, augmentation=AUG,
                        privacy=PrivacyConfig(enabled=False), noise_multiplier=None, device=torch.device("cpu"),
                        seed=1, class_weights=[0.5, 1.0])
    assert stats.steps == 3
    assert not torch.equal(_flat(model), before)
