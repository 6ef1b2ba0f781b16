"""Local training (DP-SGD with Opacus, or plain SGD) and evaluation of one site's model."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedrad.common.augment import augment_batch
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.errors import PrivacyError

log = logging.getLogger(__name__)


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Indexes an :class:`ImageSplit` (in memory or memory-mapped) without copying it whole."""

    def __init__(self, split: ImageSplit) -> None:
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[i], dtype=np.float32)), torch.tensor(int(self.labels[i]))

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Batched fetch: one fancy-index into the array instead of one per sample.
        order = np.asarray(idx, dtype=np.int64)
        x = torch.from_numpy(np.array(self.images[order], dtype=np.float32))
        y = torch.from_numpy(np.asarray(self.labels[order], dtype=np.int64))
        return list(zip(x, y))


@dataclass(frozen=True)
class TrainStats:
    train_loss: float
    steps: int
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    seconds: float


def _optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _proximal_pull(model: nn.Module, anchor: list[torch.Tensor] | None, mu: float, lr: float) -> None:
    """FedProx: move weights towards the round's global weights after each step.

    Applied after the (DP) optimiser step, so it is post-processing of a private output plus a
    data-independent term: it costs no privacy.
    """
    if anchor is None or mu <= 0:
        return
    with torch.no_grad():
        for p, a in zip(model.parameters(), anchor):
            p.sub_(lr * mu * (p - a))


def train_local(
    *,
    model: nn.Module,
    split: ImageSplit,
    training: TrainingConfig,
    augmentation: AugmentationConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    device: torch.device,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``training.local_epochs`` epochs on ``split``.

    With ``privacy.enabled`` the model is trained with DP-SGD (Poisson sampling, per-sample
    clipping to ``privacy.max_grad_norm``, Gaussian noise ``noise_multiplier``); the caller must
    have reserved the matching steps in the site's ledger first.
    """
    if privacy.enabled and noise_multiplier is None:
        raise PrivacyError("DP training needs an explicit noise_multiplier (calibrate and reserve it first)")
    if len(split) == 0:
        raise PrivacyError("cannot train on an empty split")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if training.proximal_mu > 0 else None
    dataset = ArrayDataset(split)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=gen, drop_last=False)
    optimizer = _optimizer(model, training)
    expected_steps = math.ceil(len(split) / training.batch_size) * training.local_epochs
    sample_rate = 1.0 / len(loader)
    hooks = None
    if privacy.enabled:
        assert noise_multiplier is not None
        engine = PrivacyEngine(accountant=privacy.accountant)
        hooks, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=privacy.grad_sample_mode,
            wrap_model=privacy.grad_sample_mode == "ew",  # ew needs its wrapper; others hook the model itself
        )
        forward: nn.Module = hooks if privacy.grad_sample_mode == "ew" else model
    else:
        forward = model
    # Loss is summed on the device: no host sync per step (it stalls the GPU queue).
    total_loss, total_n, steps = torch.zeros((), device=device), 0, 0
    try:
        for _epoch in range(training.local_epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                if len(y) > 0:
                    x = augment_batch(x, augmentation, gen)
                    loss = F.cross_entropy(forward(x), y)
                    loss.backward()
                    total_loss += loss.detach() * len(y)
                    total_n += len(y)
                optimizer.step()  # an empty Poisson batch still takes a (pure-noise) DP step
                _proximal_pull(model, anchor, training.proximal_mu, training.lr)
                steps += 1
                if progress is not None:
                    progress(steps, expected_steps, float(total_loss) / max(total_n, 1))
    finally:
        if hooks is not None and hasattr(hooks, "cleanup"):
            hooks.cleanup()
        elif hooks is not None and hasattr(hooks, "_close"):
            hooks._close()
    if privacy.enabled and steps != expected_steps:
        raise PrivacyError(f"took {steps} DP steps but {expected_steps} were reserved; ledger would be wrong")
    return TrainStats(
        train_loss=float(total_loss) / max(total_n, 1),
        steps=steps,
        num_examples=len(split),
        noise_multiplier=float(noise_multiplier or 0.0),
        sample_rate=sample_rate,
        seconds=time.perf_counter() - t0,
    )
