"""Local training (DP-SGD, or plain SGD) of one site's model.

DP-SGD here takes sampling out of Opacus' data loader: the node draws each step's Poisson mask
itself (every example independently with probability ``sample_rate``) for exactly the planned
number of steps, so the steps taken are the steps reserved in the ledger for every dataset size.
Per-sample clipping and noise: ``privacy.grad_sample_mode`` "mixed", "ghost" or "per-sample" use
fedrad's engine (:mod:`fedrad.client.training.dp_engine`: one forward, one backward, per-sample
gradient norms without per-sample gradients where that is cheaper); "ew", "hooks", "functorch"
use Opacus' ``GradSampleModule`` and ``DPOptimizer``. Both use Opacus' clipping factor and noise
(a data-independent ``expected_batch_size``) and give the same gradients to float rounding. An
empty Poisson batch takes its step too: pure noise.

Augmentation multiplicity K (``training.augmentation_multiplicity``, De et al. 2022): each sampled
example is augmented K times independently; its gradient is the mean of its K views' gradients,
taken before clipping, so one example is still one unit for clipping, noise and accounting.

All DP randomness (Poisson masks, augmentation, Gaussian noise) comes from generators seeded
with fresh OS entropy on every call; torch's global generator is never used for it. An explicit
``seed`` exists only for a simulation with ``simulation.reproducible_randomness`` (and tests).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Dataset

from fedrad.client.training.dp_engine import MODES as ENGINE_MODES
from fedrad.client.training.dp_engine import DPStep, make_dp_step
from fedrad.common.augment import augment_batch
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.errors import PrivacyError
from fedrad.common.planning import sampling_plan
from fedrad.common.privacy import steps_per_epoch

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
        x, y = self.batch(np.asarray(idx, dtype=np.int64))
        return list(zip(x, y))

    def batch(self, order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One fancy-index into the arrays for a whole batch (sorted indices read memory maps in order)."""
        x = torch.from_numpy(np.array(self.images[order], dtype=np.float32))
        y = torch.from_numpy(np.asarray(self.labels[order], dtype=np.int64))
        return x, y


@dataclass(frozen=True)
class TrainStats:
    #: Stays on the node (its log); never sent: it is not DP-protected.
    train_loss: float
    steps: int
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    seconds: float


class WeightedDPOptimizer(DPOptimizer):
    """Opacus' DP optimiser with per-example weights applied *after* clipping, and views.

    Each example's gradient is clipped to ``max_grad_norm`` exactly as in :class:`DPOptimizer`,
    then multiplied by its weight ``w_i`` in [0, 1] before summing, so every example still moves
    the sum by at most ``max_grad_norm``: the sensitivity, the noise and the accounting are those
    of plain DP-SGD. (Weighting the loss instead would be undone by clipping.) ``sample_weights``
    is set before each step; None means all ones.

    ``views`` = K > 1 (augmentation multiplicity): the per-sample gradients hold K consecutive
    rows (views) per example; an example's gradient is their mean, taken before clipping.
    """

    sample_weights: torch.Tensor | None = None
    views: int = 1

    def _per_example(self, grad_sample: torch.Tensor) -> torch.Tensor:
        if self.views == 1:
            return grad_sample
        if len(grad_sample) % self.views:
            raise PrivacyError(f"{len(grad_sample)} per-sample gradients are not {self.views} views per example")
        return grad_sample.reshape(len(grad_sample) // self.views, self.views, *grad_sample.shape[1:]).mean(dim=1)

    def clip_and_accumulate(self) -> None:
        w = self.sample_weights
        if (w is None and self.views == 1) or len(self.grad_samples[0]) == 0:
            super().clip_and_accumulate()
            return
        if w is not None and (bool((w < 0).any()) or bool((w > 1).any())):
            raise PrivacyError("per-example weights must lie in [0, 1] (they may not raise the sensitivity)")
        per_example = [self._per_example(g) for g in self.grad_samples]
        per_sample_norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in per_example],
                                       dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
        if w is not None:
            factor = factor * w.to(per_sample_norms)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._per_example(self._get_flat_grad_sample(p).to(p.dtype))
            grad = torch.einsum("i,i...", factor.to(grad_sample.device).to(p.dtype), grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


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


def _seed(seed: int | None, stream: int) -> int:
    """A generator seed: fresh OS entropy, or (reproducible simulation only) derived from ``seed``."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    return (int(seed) * 1_000_003 + stream) % (2**63)


def dp_generators(device: torch.device, *, seed: int | None = None) -> tuple[torch.Generator, torch.Generator]:
    """(sampling and augmentation generator on the CPU, noise generator on ``device``), each seeded
    with its own 64 bits of OS entropy unless ``seed`` is given."""
    sampling = torch.Generator().manual_seed(_seed(seed, 1))
    noise = torch.Generator(device=device).manual_seed(_seed(seed, 2))
    return sampling, noise


def _views(*, training: TrainingConfig, augmentation: AugmentationConfig) -> int:
    """The augmentation multiplicity K to train with (1 where augmentation is off: K identical
    views average to the one view, so they would only cost time)."""
    k = int(training.augmentation_multiplicity)
    if k > 1 and not augmentation.enabled:
        log.warning("training.augmentation_multiplicity=%d without data.augmentation: identical views, "
                    "training with one view", k)
        return 1
    return k


def _with_views(x: torch.Tensor, views: int, augmentation: AugmentationConfig,
                generator: torch.Generator) -> torch.Tensor:
    """``views`` independently augmented copies of each example, example-major: rows
    ``i*K .. i*K+K-1`` are example i's views (augmentation randomness from ``generator``)."""
    if views > 1:
        x = x.repeat_interleave(views, dim=0)
    return augment_batch(x, augmentation, generator)


def _noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP step of an empty Poisson batch: no gradient, only the Gaussian noise (its privacy
    cost is that of any step, and it is reserved like any step). Opacus' own empty-batch path:
    zero per-sample gradients, so clipping sums to zero and the step adds the noise alone."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def train_local(
    *,
    model: nn.Module,
    split: ImageSplit,
    training: TrainingConfig,
    augmentation: AugmentationConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    device: torch.device,
    seed: int | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
    expected_batch_size: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    class_weights: list[float] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``split``.

    With ``privacy.enabled``: DP-SGD for exactly ``steps`` steps, each on a Poisson sample of rate
    ``sample_rate`` (per-sample clipping to ``privacy.max_grad_norm``, Gaussian noise
    ``noise_multiplier``, gradients divided by ``expected_batch_size``). The hospital passes its
    round plan (computed from the DP-released size, and reserved in its ledger first); without
    them, they are derived from ``len(split)`` (benchmarks, tests). Without DP: ``local_epochs``
    shuffled epochs of plain SGD.

    ``seed``: None (always, on a node) draws all randomness from OS entropy; an int only for a
    reproducible simulation or a test. ``class_weights`` (one per class, each in (0, 1]): under DP
    each example's clipping coefficient is scaled by its class's weight (``w_i * min(1, C/||g_i||)``);
    without DP the loss is weighted. ``training.augmentation_multiplicity`` K: every example is
    seen as K augmented views and its gradient is their mean (before clipping).
    """
    if privacy.enabled and noise_multiplier is None:
        raise PrivacyError("DP training needs an explicit noise_multiplier (calibrate and reserve it first)")
    if len(split) == 0:
        raise PrivacyError("cannot train on an empty split")
    t0 = time.perf_counter()
    if seed is not None:  # reproducible simulation: also the model's own randomness (dropout)
        torch.manual_seed(_seed(seed, 0))
    gen, noise_gen = dp_generators(device, seed=seed)
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if training.proximal_mu > 0 else None
    dataset = ArrayDataset(split)
    n = len(split)
    optimizer: Any = _optimizer(model, training)
    hooks: Any = None
    engine: DPStep | None = None
    forward: nn.Module = model
    views = _views(training=training, augmentation=augmentation)
    if privacy.enabled:
        default = sampling_plan(num_examples=n, batch_size=training.batch_size, local_epochs=training.local_epochs)
        q = sample_rate if sample_rate is not None else default.sample_rate
        total = steps if steps is not None else default.steps
        ebs = expected_batch_size if expected_batch_size is not None else q * n
        if not (0 < q <= 1) or total < 1 or not ebs > 0:
            raise PrivacyError(f"bad DP plan: sample_rate={q!r}, steps={total!r}, expected_batch_size={ebs!r}")
        ModuleValidator.validate(model, strict=True)
        mode = privacy.grad_sample_mode
        if mode in ENGINE_MODES:
            engine = make_dp_step(model, optimizer, noise_multiplier=float(noise_multiplier or 0.0),
                                  max_grad_norm=privacy.max_grad_norm, expected_batch_size=ebs,
                                  generator=noise_gen, mode=mode, views=views)  # type: ignore[arg-type]
            optimizer = engine.optimizer
        else:
            hooks = prepare_module(model, grad_sample_mode=mode, wrap_model=mode == "ew", batch_first=True,
                                   loss_reduction="mean")
            forward = hooks if mode == "ew" else model
            optimizer = WeightedDPOptimizer(optimizer, noise_multiplier=float(noise_multiplier or 0.0),
                                            max_grad_norm=privacy.max_grad_norm,
                                            expected_batch_size=ebs,  # type: ignore[arg-type]
                                            loss_reduction="mean", generator=noise_gen)
            optimizer.views = views
        batches = (torch.nonzero(torch.rand(n, generator=gen) < q).flatten().numpy() for _ in range(total))
    else:
        q, total = 1.0, steps_per_epoch(num_examples=n, batch_size=training.batch_size) * training.local_epochs
        b = training.batch_size
        batches = (np.sort(perm[i: i + b]) for _ in range(training.local_epochs)
                   for perm in [torch.randperm(n, generator=gen).numpy()] for i in range(0, n, b))
    weights: torch.Tensor | None = None
    if class_weights is not None:
        weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32, device=device)
        if not bool(((weights > 0) & (weights <= 1)).all()):
            raise PrivacyError(f"class weights must lie in (0, 1], got {class_weights!r}")
    # Loss is summed on the device: no host sync per step (it stalls the GPU queue).
    total_loss, total_n, taken = torch.zeros((), device=device), 0, 0
    try:
        for idx in batches:
            if len(idx) > 0:
                x, y = dataset.batch(idx)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = _with_views(x, views, augmentation, gen)
                if engine is not None:
                    loss = engine.step(x, y, weights=None if weights is None else weights[y])
                else:
                    optimizer.zero_grad(set_to_none=True)
                    yv = y if views == 1 else y.repeat_interleave(views)
                    if weights is not None and privacy.enabled:
                        optimizer.sample_weights = weights[y]
                        loss = F.cross_entropy(forward(x), yv)
                    elif weights is not None:
                        loss = (F.cross_entropy(forward(x), yv, reduction="none") * weights[yv]).mean()
                    else:
                        loss = F.cross_entropy(forward(x), yv)
                    loss.backward()
                    optimizer.step()
                total_loss += loss.detach() * len(y)
                total_n += len(y)
            elif engine is not None:
                engine.noise_step()
            elif privacy.enabled:
                optimizer.zero_grad(set_to_none=True)
                _noise_only_step(optimizer)
            _proximal_pull(model, anchor, training.proximal_mu, training.lr)
            taken += 1
            if progress is not None:
                progress(taken, total, float(total_loss) / max(total_n, 1))
    finally:
        if engine is not None:
            engine.close()
        if hooks is not None and hasattr(hooks, "cleanup"):
            hooks.cleanup()
        elif hooks is not None and hasattr(hooks, "_close"):
            hooks._close()
        for p in model.parameters():  # leave no per-sample state behind on the returned model
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    setattr(p, attr, None)
    if taken != total:
        raise PrivacyError(f"took {taken} steps but {total} were planned; ledger would be wrong")
    return TrainStats(
        train_loss=float(total_loss) / max(total_n, 1),
        steps=taken,
        num_examples=n,
        noise_multiplier=float(noise_multiplier or 0.0),
        sample_rate=q,
        seconds=time.perf_counter() - t0,
    )
