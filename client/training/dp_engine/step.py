"""One DP-SGD step with one forward and one backward pass, no per-sample gradients where cheaper.

:class:`DPStep` replaces Opacus' ``GradSampleModule`` + ``DPOptimizer`` pair in a training loop:

1. forward, recording each trainable layer's input and output (forward hooks);
2. one backward pass of the summed per-sample losses *to the layer outputs only* (no parameter
   gradients are computed by autograd);
3. per layer, the squared per-sample gradient norm by ghost norm or materialised per-sample
   gradient, whichever is cheaper (:mod:`.mixed`);
4. Opacus' clipping coefficients ``min(1, C / (||g_i|| + 1e-6))``, then per parameter the clipped
   sum ``sum_i c_i g_i`` (book-keeping: no second backward pass);
5. Opacus' own noise and averaging (``DPOptimizerFastGradientClipping``'s, in
   :class:`LeanNoiseOptimizer`: Gaussian noise of standard deviation
   ``noise_multiplier * max_grad_norm`` from the given generator, in the optimizer's parameter
   order, then division by ``expected_batch_size``) and the wrapped optimizer's step.

So the noisy gradient is the one Opacus' ``ew``/``hooks`` engines produce for the same batch and the
same noise generator state, to float rounding (tests/test_dp_engine.py checks it).

Two extensions, neither of which changes the sensitivity (each example moves the clipped sum by
at most ``max_grad_norm``) or the accounting (one example is one unit):

- per-example weights ``w_i`` in [0, 1] (class weighting) multiply the clipping coefficient:
  ``w_i * min(1, C / ||g_i||)``;
- augmentation multiplicity K (De et al. 2022, ``views``): the batch holds K augmented views per
  example (rows ``i*K .. i*K+K-1``); an example's loss is the MEAN of its views' losses, so its
  gradient (the one clipped) is the mean of its views' gradients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from fedrad.client.training.dp_engine.mixed import (
    MODES,
    LayerNorms,
    LayerRule,
    Mode,
    clip_coefficients,
    rule_for,
)
from fedrad.common.errors import PrivacyError

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


class LeanNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ``DPOptimizerFastGradientClipping`` with the same noise, fewer memory passes.

    Per parameter, Opacus copies the clipped sum into ``summed_grad``, allocates a zero tensor it
    discards (outside secure mode), draws the noise, and adds both into a third tensor. Here the
    clipped sum the engine just computed becomes ``summed_grad`` itself, and the noise is drawn by
    the same call (``torch.normal(mean=0, std=sigma*C, size, generator)``, same parameter order,
    same generator) and the clipped sum added to it in place: the noisy gradient is bitwise the one
    Opacus computes (float addition commutes). ``secure_mode`` and accumulation across skipped
    steps take Opacus' own code.
    """

    def accumulate(self) -> None:
        if self._step_skip_queue:
            super().accumulate()
            return
        for p in self.params:
            if p.summed_grad is None:  # type: ignore[attr-defined]
                p.summed_grad = p.grad  # type: ignore[attr-defined]  # a fresh tensor each step
            else:
                p.summed_grad.add_(p.grad.data)  # type: ignore[attr-defined, union-attr]

    def add_noise(self) -> None:
        if self.secure_mode:
            super().add_noise()
            return
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            summed: torch.Tensor = p.summed_grad  # type: ignore[attr-defined]
            _check_processed_flag(summed)
            if std == 0:
                grad = summed.clone()
            else:
                grad = torch.normal(mean=0, std=std, size=summed.shape, device=summed.device,
                                    generator=self.generator, dtype=summed.dtype)
                grad.add_(summed)
            p.grad = grad.view_as(p)
            _mark_as_processed(summed)


class _Record:
    __slots__ = ("activation", "output", "saved", "version")

    def __init__(self, activation: torch.Tensor, output: torch.Tensor, saved: object) -> None:
        self.activation = activation
        self.output = output
        self.saved = saved  # the layer rule's capture() (e.g. GroupNorm's forward statistics)
        self.version = output._version


class DPStep:
    """DP-SGD steps on ``model`` with ``optimizer`` (a plain torch optimizer over its parameters).

    Build it with :func:`make_dp_step`. Use :meth:`step` per Poisson batch (an empty batch takes a
    noise-only step), :attr:`optimizer` for state or learning-rate access, :meth:`close` when done.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator,
        mode: Mode = "mixed",
        loss_fn: LossFn = per_sample_cross_entropy,
        secure_mode: bool = False,
        views: int = 1,
    ) -> None:
        _check_arguments(model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, generator=generator, mode=mode, views=views)
        self.model = model
        self.mode: Mode = mode
        self.views = int(views)
        self.loss_fn = loss_fn
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[tuple[str, nn.Module, LayerRule]] = []
        for name, m in model.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                self.layers.append((name, m, rule_for(m)))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if {id(p) for p in in_optimizer} != trainable or len(in_optimizer) != len(trainable):
            raise PrivacyError("the optimizer must hold exactly the model's trainable parameters, each once")
        self.optimizer = LeanNoiseOptimizer(
            optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
        )
        self._records: dict[nn.Module, _Record] = {}
        self._capturing = False
        self._rules: dict[nn.Module, LayerRule] = {m: rule for _, m, rule in self.layers}
        self._handles = [m.register_forward_hook(self._capture) for _, m, _ in self.layers]
        #: Filled on the first step: "<layer>.<param>" whose norm is taken by the ghost path.
        self.ghost_parameters: list[str] = []
        self._planned = False

    # ---- hooks -------------------------------------------------------------------------------------
    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self._capturing:
            return
        if module in self._records:
            raise PrivacyError(f"layer {type(module).__name__} ran twice in one forward pass "
                               "(shared parameters are not supported)")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise PrivacyError(f"layer {type(module).__name__}: output does not carry gradients "
                               "(forward under torch.no_grad()?)")
        self._records[module] = _Record(inputs[0].detach(), output, self._rules[module].capture(module, output))

    # ---- steps ---------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One DP step on the batch ``(x, y)``; returns the batch's mean loss (detached, on the device).

        ``x``: ``B * views`` inputs (each example's views consecutive), ``y``: the ``B`` examples'
        targets. ``weights``: None, or ``B`` per-example weights in [0, 1] multiplying each
        example's clipping coefficient. The returned loss is not DP-protected: keep it on the node.
        """
        self._check_batch(x, y, weights)
        if x.shape[0] == 0:
            self.noise_step()
            return torch.zeros((), device=x.device)
        self.optimizer.zero_grad(set_to_none=True)
        self._records.clear()
        self._capturing = True
        try:
            logits = self.model(x)
        finally:
            self._capturing = False
        try:
            losses = self._per_sample_losses(logits, y)
            self._clip_and_accumulate(losses, weights)
        finally:
            self._records.clear()
        self.optimizer.step()
        return losses.detach().mean()

    def noise_step(self) -> None:
        """The step of an empty Poisson batch: zero clipped sum, so the update is the noise alone."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()

    def per_sample_norms(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample gradient norms ``(B,)`` of ``(x, y)`` by this engine's path, without a step.

        For tests and diagnostics on the node only: the norms are NOT DP-protected.
        """
        self._check_batch(x, y, None)
        self._records.clear()
        self._capturing = True
        try:
            logits = self.model(x)
        finally:
            self._capturing = False
        try:
            norm2, _ = self._norms(self._per_sample_losses(logits, y))
        finally:
            self._records.clear()
        return norm2.sqrt()

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> None:
        if x.shape[0] != y.shape[0] * self.views:
            raise PrivacyError(f"batch of {x.shape[0]} inputs but {y.shape[0]} targets "
                               f"with {self.views} view(s) per example")
        if weights is None:
            return
        if weights.shape != (y.shape[0],):
            raise PrivacyError(f"need one weight per example, shape ({y.shape[0]},); got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or bool((weights > 1).any()):
            raise PrivacyError("per-example weights must lie in [0, 1] (they may not raise the sensitivity)")

    def _per_sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One loss per EXAMPLE: with views, the mean of its views' losses."""
        target = y if self.views == 1 else y.repeat_interleave(self.views)
        losses = self.loss_fn(logits, target)
        if losses.shape != (target.shape[0],):
            raise PrivacyError(f"loss_fn must return one loss per sample, shape ({target.shape[0]},); "
                               f"got {tuple(losses.shape)}")
        if self.views > 1:
            losses = losses.view(y.shape[0], self.views).mean(dim=1)
        return losses

    def _norms(self, losses: torch.Tensor) -> tuple[torch.Tensor, list[LayerNorms]]:
        """Squared per-sample norms over all layers, and each layer's pending clipped sum."""
        recorded = [(name, m, rule) for name, m, rule in self.layers if m in self._records]
        for name, m, _ in recorded:
            if self._records[m].output._version != self._records[m].version:
                raise PrivacyError(f"layer {name!r}: its output was modified in place; "
                                   "per-sample gradients would be wrong")
        outputs = [self._records[m].output for _, m, _ in recorded]
        # the gradient of the SUM of per-example losses at each layer output: row r holds view r's
        # gradient already divided by K (the loss averages an example's views)
        backprops = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
        norm2 = torch.zeros(losses.shape[0], device=losses.device, dtype=losses.dtype)
        pending: list[LayerNorms] = []
        first = not self._planned
        for (name, m, rule), g in zip(recorded, backprops):
            if g is None:  # output not used by the loss: zero gradient for this layer
                continue
            record = self._records[m]
            result = rule.norms(m, record.activation, g.detach(), self.mode, views=self.views,
                                output=record.output, saved=record.saved)
            norm2 = norm2 + result.norm2.to(norm2.dtype)
            pending.append(result)
            if first:
                self.ghost_parameters += [f"{name}.{p}" for p in result.ghost]
        if first:
            self._planned = True
            log.debug("DP engine (%s): ghost norm for %d parameter(s): %s", self.mode,
                      len(self.ghost_parameters), self.ghost_parameters)
        return norm2, pending

    def _clip_and_accumulate(self, losses: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        norm2, pending = self._norms(losses)
        coef = clip_coefficients(norm2, max_grad_norm=self.max_grad_norm)
        if weights is not None:  # w_i * min(1, C/||g_i||) <= C/||g_i||: the sensitivity stays <= C
            coef = coef * weights.to(device=coef.device, dtype=coef.dtype)
        for result in pending:
            for p, s in result.finish(coef).items():
                p.grad = s.to(p.dtype).view_as(p)
        for p in self.optimizer.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    # ---- life cycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks and leave no DP book-keeping on the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records.clear()
        for p in self.optimizer.params:
            p.summed_grad = None  # type: ignore[attr-defined]

    def __enter__(self) -> DPStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_arguments(model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                     max_grad_norm: float, expected_batch_size: float, generator: torch.Generator,
                     mode: str, views: int) -> None:
    if mode not in MODES:
        raise PrivacyError(f"unknown DP engine mode {mode!r} (known: {', '.join(MODES)})")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise PrivacyError(f"bad views (augmentation multiplicity): {views!r}")
    for name, value, ok in (
        ("noise_multiplier", noise_multiplier, lambda v: v >= 0),
        ("max_grad_norm", max_grad_norm, lambda v: v > 0),
        ("expected_batch_size", expected_batch_size, lambda v: v > 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise PrivacyError(f"bad {name}: {value!r}")
    if not isinstance(generator, torch.Generator):
        raise PrivacyError("the DP noise needs an explicit torch.Generator (seeded from OS entropy on a node)")
    if isinstance(optimizer, DPOptimizer):
        raise PrivacyError("pass the plain optimizer; the DP engine wraps it itself")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"model not DP-compatible: {'; '.join(str(e) for e in errors)}")
    devices = {p.device.type for p in model.parameters() if p.requires_grad}
    if devices and devices != {generator.device.type}:
        raise PrivacyError(f"noise generator on {generator.device.type} but parameters on {sorted(devices)}")


def make_dp_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
    mode: Mode = "mixed",
    loss_fn: LossFn = per_sample_cross_entropy,
    secure_mode: bool = False,
    views: int = 1,
) -> DPStep:
    """A :class:`DPStep` for ``model`` trained by ``optimizer``.

    ``mode``: "mixed" (per layer the cheaper of ghost norm and per-sample gradient, the default),
    "ghost" (ghost norm wherever a layer has one), "per-sample" (always materialised). All three
    give the same gradients to float rounding. ``loss_fn(logits, target)`` must return per-sample
    losses (default: cross-entropy). ``expected_batch_size`` divides the noisy sum (Opacus'
    ``loss_reduction="mean"``); it must not depend on the data (``q * N_released`` on a node).
    ``views``: augmentation multiplicity K (each step's input holds K consecutive views per example).
    """
    return DPStep(model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, generator=generator, mode=mode, loss_fn=loss_fn,
                  secure_mode=secure_mode, views=views)
