"""Per layer: per-sample gradient norms, then the clipped gradient sum ("book-keeping").

For each trainable layer the engine holds its input activations ``a`` and its output gradients
``g`` (of the per-sample loss sum) from one forward and one backward pass. A :class:`LayerRule`
turns them into

1. the squared per-sample norm of the layer's gradient (all its parameters), and
2. once every layer's norm is known and the per-sample clipping coefficients ``c`` are fixed,
   ``sum_i c_i * grad_i`` for each parameter.

Per parameter it takes the cheaper of two paths (mixed ghost clipping, Bu et al. 2022):

- *ghost*: norm from Gram matrices / factorised products, and the clipped sum as ONE ordinary
  weight-gradient computation on rescaled output gradients (book-keeping, Bu et al. 2023: no
  second backward pass through the network);
- *per-sample*: the per-sample gradient is materialised; norm and clipped sum read it.

Both give the same numbers up to float rounding; the choice depends on layer shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from fedrad.client.training.dp_engine import norm_samplers as ns
from fedrad.common.errors import PrivacyError

Mode = Literal["mixed", "ghost", "per-sample"]
MODES: tuple[str, ...] = ("mixed", "ghost", "per-sample")

Finish = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]


@dataclass
class LayerNorms:
    """One layer's squared per-sample norm and how to finish its clipped sum."""

    norm2: torch.Tensor
    finish: Finish
    ghost: list[str] = field(default_factory=list)  # names of parameters taken by the ghost path


def _weighted(coef: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_i coef_i * per_sample_i``, the contraction Opacus' DPOptimizer uses."""
    return torch.einsum("i,i...", coef.to(per_sample.dtype), per_sample)


def _sq_norms(per_sample: torch.Tensor, b: int) -> torch.Tensor:
    """Squared per-sample norms ``(B,)`` of a ``(B, ...)`` tensor (no squared copy in memory)."""
    return torch.linalg.vector_norm(per_sample.reshape(b, -1), dim=1).square()


def _materialised(grads: dict[nn.Parameter, torch.Tensor], b: int,
                  ref: torch.Tensor) -> tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    norm2 = torch.zeros(b, device=ref.device, dtype=ref.dtype)
    for gs in grads.values():
        norm2 = norm2 + _sq_norms(gs, b)
    return norm2, grads


def _finish_materialised(grads: dict[nn.Parameter, torch.Tensor]) -> Finish:
    return lambda coef: {p: _weighted(coef, gs) for p, gs in grads.items()}


def sum_views(per_row: torch.Tensor, views: int) -> torch.Tensor:
    """``(B*K, ...)`` per-view tensors (example-major rows) to ``(B, ...)`` sums over each example's views."""
    if views == 1:
        return per_row
    return per_row.reshape(per_row.shape[0] // views, views, *per_row.shape[1:]).sum(dim=1)


class LayerRule:
    """How one layer type computes norms and clipped sums."""

    def norms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, mode: Mode, *,
              views: int = 1, output: torch.Tensor | None = None, saved: object = None) -> LayerNorms:
        """``a``, ``g``: the layer's input and output gradient, ``B*K`` rows (``views`` = K
        consecutive rows per example). Norms and clipped sums are per EXAMPLE: of the sum of its
        views' gradients (the loss already averages over views, so that sum is the mean gradient).
        ``output``: the layer's recorded output; ``saved``: what :meth:`capture` returned for it
        during the forward pass."""
        raise NotImplementedError

    def capture(self, layer: nn.Module, output: torch.Tensor) -> object:
        """Called in the layer's forward hook: anything the forward pass computed that
        :meth:`norms` can reuse (autograd frees its saved tensors in the backward pass)."""
        return None


class LinearRule(LayerRule):
    def norms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, mode: Mode, *,
              views: int = 1, output: torch.Tensor | None = None, saved: object = None) -> LayerNorms:
        assert isinstance(layer, nn.Linear)
        b = g.shape[0] // views
        a = a.to(g.dtype)
        # (B, K*T, d): an example's views are further positions of that example
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        t = a3.shape[1]
        norm2 = torch.zeros(b, device=g.device, dtype=g.dtype)
        per_sample: dict[nn.Parameter, torch.Tensor] = {}
        ghost_w = False
        w = layer.weight
        if w.requires_grad:
            ghost_w = mode == "ghost" or (mode == "mixed" and ns.prefer_ghost(
                positions=t, fan_in=layer.in_features, fan_out=layer.out_features))
            if ghost_w:
                if t == 1:
                    norm2 = norm2 + g3.pow(2).sum(dim=(1, 2)) * a3.pow(2).sum(dim=(1, 2))
                else:
                    gram_g = torch.bmm(g3, g3.transpose(1, 2))
                    gram_a = torch.bmm(a3, a3.transpose(1, 2))
                    norm2 = norm2 + (gram_g * gram_a).sum(dim=(1, 2)).clamp(min=0)
            else:
                per_sample[w] = torch.bmm(g3.transpose(1, 2), a3)
        if layer.bias is not None and layer.bias.requires_grad:
            per_sample[layer.bias] = g3.sum(dim=1)
        for gs in per_sample.values():
            norm2 = norm2 + _sq_norms(gs, b)

        def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
            out = {p: _weighted(coef, gs) for p, gs in per_sample.items()}
            if ghost_w:
                scaled = g3 * coef.to(g3.dtype).view(b, 1, 1)
                out[w] = torch.mm(scaled.reshape(-1, g3.shape[-1]).t(), a3.reshape(-1, a3.shape[-1]))
            return out

        return LayerNorms(norm2=norm2, finish=finish, ghost=["weight"] if ghost_w else [])


class Conv2dRule(LayerRule):
    def norms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, mode: Mode, *,
              views: int = 1, output: torch.Tensor | None = None, saved: object = None) -> LayerNorms:
        assert isinstance(layer, nn.Conv2d)
        if not ns.conv_fast_path(layer):
            return OpacusRule().norms(layer, a, g, mode, views=views, output=output, saved=saved)
        b = g.shape[0] // views
        a = a.to(g.dtype)
        norm2 = torch.zeros(b, device=g.device, dtype=g.dtype)
        per_sample: dict[nn.Parameter, torch.Tensor] = {}
        w = layer.weight
        ghost_w = False
        if w.requires_grad:
            s = ns.conv_shape(layer, g)
            ghost_w = mode == "ghost" or (mode == "mixed" and ns.prefer_ghost(
                positions=views * s.positions, fan_in=s.fan_in, fan_out=s.fan_out, groups=s.groups))
            if ghost_w:
                norm2 = norm2 + ns.conv2d_weight_ghost_norm2(layer, a, g, views=views)
            else:
                sample = (ns.conv2d_weight_grad_sample_unfold if ns.prefer_unfold(layer)
                          else ns.conv2d_weight_grad_sample)
                per_sample[w] = sample(layer, a, g, views=views)
        if layer.bias is not None and layer.bias.requires_grad:
            per_sample[layer.bias] = sum_views(ns.conv2d_bias_grad_sample(g), views)
        for gs in per_sample.values():
            norm2 = norm2 + _sq_norms(gs, b)

        def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
            out = {p: _weighted(coef, gs) for p, gs in per_sample.items()}
            if ghost_w:
                out[w] = ns.conv2d_weighted_weight_grad(layer, a, g, coef.repeat_interleave(views))
            return out

        return LayerNorms(norm2=norm2, finish=finish, ghost=["weight"] if ghost_w else [])


class GroupNormRule(LayerRule):
    def capture(self, layer: nn.Module, output: torch.Tensor) -> object:
        assert isinstance(layer, nn.GroupNorm)
        return ns.group_norm_forward_stats(layer, output)

    def norms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, mode: Mode, *,
              views: int = 1, output: torch.Tensor | None = None, saved: object = None) -> LayerNorms:
        assert isinstance(layer, nn.GroupNorm)
        stats = saved if isinstance(saved, tuple) else (
            None if output is None else ns.group_norm_forward_stats(layer, output))
        grads = {p: sum_views(gs, views)
                 for p, gs in ns.group_norm_grad_sample(layer, [a], g, stats=stats).items()}
        norm2, grads = _materialised(grads, g.shape[0] // views, g)
        return LayerNorms(norm2=norm2, finish=_finish_materialised(grads))


class OpacusRule(LayerRule):
    """Any other layer Opacus has a per-sample gradient sampler for: materialised."""

    def norms(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, mode: Mode, *,
              views: int = 1, output: torch.Tensor | None = None, saved: object = None) -> LayerNorms:
        sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
        if sampler is None:
            raise PrivacyError(f"no per-sample gradient rule for layer type {type(layer).__name__}")
        grads = {p: sum_views(gs, views) for p, gs in sampler(layer, [a], g).items() if p.requires_grad}
        norm2, grads = _materialised(grads, g.shape[0] // views, g)
        return LayerNorms(norm2=norm2, finish=_finish_materialised(grads))


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.GroupNorm: GroupNormRule(),
}


def rule_for(layer: nn.Module) -> LayerRule:
    """The rule for ``layer`` (exact type), or a :class:`PrivacyError` if it has none."""
    rule = RULES.get(type(layer))
    if rule is not None:
        return rule
    if type(layer) in GradSampleModule.GRAD_SAMPLERS:
        return OpacusRule()
    raise PrivacyError(f"layer type {type(layer).__name__} has no per-sample gradient rule")


def clip_coefficients(norm2: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clipping factor: ``min(1, C / (||g_i|| + 1e-6))``."""
    return (max_grad_norm / (norm2.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)


def layer_cost_table(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, int, int, int, bool]]:
    """(name, type, T, D, p, ghost?) per Conv2d/Linear for an input like ``example`` (mixed mode)."""
    rows: list[tuple[str, str, int, int, int, bool]] = []
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def f(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                s = ns.conv_shape(m, out)
                rows.append((name, "Conv2d", s.positions, s.fan_in, s.fan_out,
                             ns.prefer_ghost(positions=s.positions, fan_in=s.fan_in, fan_out=s.fan_out,
                                             groups=s.groups)))
            elif isinstance(m, nn.Linear):
                t = math.prod(out.shape[1:-1]) if out.dim() > 2 else 1
                rows.append((name, "Linear", t, m.in_features, m.out_features,
                             ns.prefer_ghost(positions=t, fan_in=m.in_features, fan_out=m.out_features)))
        return f

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return rows
