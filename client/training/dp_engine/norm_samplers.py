"""Per-sample gradients and per-sample gradient norms for Conv2d and GroupNorm, Opacus-style.

Every function here has Opacus' sampler signature ``f(layer, activations, backprops)``:
``activations`` is the list of the layer's forward inputs (batch first) and ``backprops`` the
gradient of the loss (summed over the batch, i.e. per-sample) with respect to the layer's output.

Two registrations in Opacus' own registry (``opacus.grad_sample.register_norm_sampler``) make
Opacus' ``grad_sample_mode="ghost"`` handle the layers of fedrad's models (Opacus 1.6 ships norm
samplers for Linear and Embedding only):

- :func:`compute_conv2d_norm_sample`: "mixed ghost clipping" (Bu et al. 2022). A convolution's
  per-sample weight gradient is ``G_i U_i^T`` (``G_i``: p x T output gradients, ``U_i``: D x T
  unfolded input, T output positions, D = in_channels/groups * kernel area, p = out_channels).
  Its norm is either read off the materialised gradient, or, without materialising it, from two
  T x T Gram matrices: ``||G_i U_i^T||^2 = <G_i^T G_i, U_i^T U_i>`` (the "ghost norm"). Which one
  is cheaper depends on the shapes only: see :func:`prefer_ghost`.
- :func:`compute_group_norm_norm_sample`: GroupNorm's per-sample gradients are tiny (one number
  per channel), so they are materialised and their norms taken.

Nothing here depends on the data other than through the tensors passed in; the ghost-or-not
decision depends on layer and input *shapes* only (never on the batch size), so it is the same on
every step of a training run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_norm_sampler
from torch import nn
from torch.nn.grad import conv2d_weight

log = logging.getLogger(__name__)

#: Cost, in multiply-add equivalents, of materialising one element of a per-sample gradient
#: (writing it, reading it for the norm, reading it again for the clipped sum) on top of the
#: arithmetic that produces it. Measured on a 2-core x86 CPU with torch 2.13 (see
#: benchmarks/dp_engine.py --layers): grouped per-sample convolutions with small outputs and many
#: channels run far below the dense kernels' speed. Bu et al. 2022 compare space instead
#: (``2 T^2`` against ``p D``); that criterion picks the ghost norm for layers where the Gram
#: matrices cost more arithmetic than the per-sample gradient saves on a CPU.
MATERIALISE_COST = 200.0


@dataclass(frozen=True)
class ConvShape:
    """The shapes that decide a convolution's cost (all per sample)."""

    positions: int  # T: output positions (H_out * W_out)
    fan_in: int  # D: in_channels / groups * kernel area
    fan_out: int  # p: out_channels
    groups: int


def prefer_ghost(*, positions: int, fan_in: int, fan_out: int, groups: int = 1) -> bool:
    """True if the ghost norm is cheaper than the materialised per-sample gradient (per sample).

    Costs per sample, counting multiply-adds (Bu et al. 2022, with a materialisation term):

    - ghost norm: two Gram matrices, ``T^2 (D + p/groups)`` per group, then the weighted
      gradient sum afterwards (a plain weight-gradient, ``T D p``);
    - per-sample gradient: ``T D p`` plus :data:`MATERIALISE_COST` per stored element (``D p``).

    A layer without spatial extent (Linear on 2-D input: ``T = 1``) always prefers the ghost norm.
    """
    t, d, p = positions, fan_in, fan_out
    ghost = groups * t * t * (d + p / groups) + t * d * p
    per_sample = t * d * p + MATERIALISE_COST * d * p
    return ghost < per_sample


def conv_shape(layer: nn.Conv2d, backprops: torch.Tensor) -> ConvShape:
    kernel = math.prod(layer.kernel_size)
    return ConvShape(
        positions=math.prod(backprops.shape[2:]),
        fan_in=layer.in_channels // layer.groups * kernel,
        fan_out=layer.out_channels,
        groups=layer.groups,
    )


def conv_fast_path(layer: nn.Module) -> bool:
    """Whether the native-kernel paths below apply (zero padding given as numbers)."""
    return (
        type(layer) is nn.Conv2d
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _views_into_batch(t: torch.Tensor, views: int) -> torch.Tensor:
    """``(B*K, C, ...)`` (example-major: rows ``i*K .. i*K+K-1`` are example i's views) to
    ``(K, B*C, ...)``: the views become the batch a weight-gradient kernel sums over, the examples
    become channel groups."""
    b = t.shape[0] // views
    return t.reshape(b, views, *t.shape[1:]).transpose(0, 1).reshape(views, b * t.shape[1], *t.shape[2:])


def conv2d_weight_grad_sample(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, *,
                              views: int = 1) -> torch.Tensor:
    """Per-example weight gradients ``(B, *weight.shape)`` in one grouped weight-gradient kernel.

    The batch is folded into the channels (groups = B * layer.groups), so the native convolution
    backward computes every sample's gradient at once (no unfolded input in memory). With
    ``views`` = K > 1 the ``B*K`` rows of ``a`` and ``g`` are K consecutive views per example and
    each example's gradient is the SUM over its views (the kernel's own batch reduction).
    """
    b = a.shape[0] // views
    w = layer.weight
    grads = conv2d_weight(
        _views_into_batch(a, views),
        (b * w.shape[0], *w.shape[1:]),
        _views_into_batch(g, views),
        stride=layer.stride,
        padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation,
        groups=b * layer.groups,
    )
    return grads.view(b, *w.shape)


#: A convolution with at most this many input channels per group (a stem on grey-scale or RGB
#: images) gets its per-sample gradient from the unfolded input and one batched matmul: its
#: unfolded input is small (``in_channels/groups * kernel area`` rows), while the grouped
#: weight-gradient kernel of :func:`conv2d_weight_grad_sample` with so few input channels is at
#: the mercy of thread scheduling (1 -> 32 channels at 64x64, batch 64, torch 2.13, loaded 2-core
#: CPU: median 2.0-2.8 s against 0.1-0.2 s for unfold+bmm with two threads; best case 16 against
#: 10 ms with two threads, 7.6 against 9.7 ms with one).
UNFOLD_MAX_IN_CHANNELS = 4


def prefer_unfold(layer: nn.Conv2d) -> bool:
    """Whether :func:`conv2d_weight_grad_sample_unfold` is the cheaper way to materialise
    ``layer``'s per-sample weight gradient (shapes only)."""
    return layer.in_channels // layer.groups <= UNFOLD_MAX_IN_CHANNELS


def unfold2d(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """``F.unfold(a, ...)`` for ``layer``'s kernel, padding, stride and dilation: ``(B, Cin*kh*kw, T)``.

    The same values (a copy of input elements, channel-major then kernel row then column), built
    from one strided slice of the zero-padded input per kernel offset and one ``stack``: torch
    2.13's CPU ``im2col`` runs 1.4-20x slower (best of 9 on a loaded 2-core CPU: 1 channel at
    64x64, batch 64: 2.5 ms against 0.34 ms; 256 channels at 8x8, batch 32: 137 ms against 8 ms).
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation  # type: ignore[misc]
    ph, pw = layer.padding  # type: ignore[misc]
    b, c, h, w = a.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    cols = [padded[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, dim=2).reshape(b, c * kh * kw, ho * wo)


def _unfolded_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, *,
                          views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfolded input ``U`` and output gradients ``G`` as ``(B*groups, Cin*k | Cout, K*T)``: an
    example's K views are K*T positions of one example."""
    groups = layer.groups
    b = a.shape[0] // views
    u = unfold2d(layer, a)  # (B*K, Cin*k, T)
    t = u.shape[-1]
    if views == 1:
        return u.view(b * groups, -1, t), g.reshape(b * groups, -1, t)
    u = u.view(b, views, groups, -1, t).permute(0, 2, 3, 1, 4).reshape(b * groups, -1, views * t)
    go = g.reshape(b, views, groups, -1, t).permute(0, 2, 3, 1, 4).reshape(b * groups, -1, views * t)
    return u, go


def conv2d_weight_grad_sample_unfold(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, *,
                                     views: int = 1) -> torch.Tensor:
    """Per-example weight gradients ``(B, *weight.shape)``: ``G_i U_i^T`` per example and group
    (unfolded input ``U_i``, output gradients ``G_i``), one batched matmul. Same numbers as
    :func:`conv2d_weight_grad_sample` (views: an example's K views are K*T positions)."""
    b = a.shape[0] // views
    u, go = _unfolded_per_example(layer, a, g, views=views)
    return torch.bmm(go, u.transpose(1, 2)).view(b, *layer.weight.shape)


def conv2d_weight_ghost_norm2(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, *,
                              views: int = 1) -> torch.Tensor:
    """Squared per-example weight-gradient norms ``(B,)`` from Gram matrices (no per-sample gradient).

    With ``views`` = K > 1, an example's K views are K*T positions of one example (the norm of the
    sum of its views' gradients).
    """
    b = a.shape[0] // views
    u, go = _unfolded_per_example(layer, a, g, views=views)
    gram_u = torch.bmm(u.transpose(1, 2), u)
    gram_g = torch.bmm(go.transpose(1, 2), go)
    return (gram_u * gram_g).view(b, -1).sum(dim=1).clamp(min=0)


def conv2d_weighted_weight_grad(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor,
                                coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef_i * grad_i`` of the weight: one plain weight-gradient kernel on rescaled backprops."""
    scaled = g * coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
    return conv2d_weight(a, layer.weight.shape, scaled, stride=layer.stride,
                         padding=layer.padding,  # type: ignore[arg-type]
                         dilation=layer.dilation, groups=layer.groups)


def conv2d_bias_grad_sample(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2)


def compute_conv2d_norm_sample(
    layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Conv2d's parameters, by ghost norm or materialised gradient,
    whichever :func:`prefer_ghost` says is cheaper for this layer's shapes."""
    a = activations[0].to(backprops.dtype)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if not conv_fast_path(layer):
            from opacus.grad_sample.conv import compute_conv_grad_sample

            gs = compute_conv_grad_sample(layer, [a], backprops)[layer.weight]
            ret[layer.weight] = gs.reshape(len(gs), -1).norm(2, dim=1)
        else:
            s = conv_shape(layer, backprops)
            if prefer_ghost(positions=s.positions, fan_in=s.fan_in, fan_out=s.fan_out, groups=s.groups):
                ret[layer.weight] = conv2d_weight_ghost_norm2(layer, a, backprops).sqrt()
            else:
                sample = conv2d_weight_grad_sample_unfold if prefer_unfold(layer) else conv2d_weight_grad_sample
                gs = sample(layer, a, backprops)
                ret[layer.weight] = gs.reshape(len(gs), -1).norm(2, dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = conv2d_bias_grad_sample(backprops).norm(2, dim=1)
    return ret


def group_norm_forward_stats(layer: nn.GroupNorm, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-sample, per-group ``(mean, rstd)`` the forward pass computed and autograd saved for
    the backward (``NativeGroupNormBackward0``), or None where they are not available."""
    fn = output.grad_fn
    if type(fn).__name__ != "NativeGroupNormBackward0":
        return None
    try:
        mean, rstd = fn._saved_result1, fn._saved_result2  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None
    shape = (output.shape[0], layer.num_groups)
    if not (isinstance(mean, torch.Tensor) and isinstance(rstd, torch.Tensor)) or mean.shape != shape \
            or rstd.shape != shape:
        return None
    return mean.detach(), rstd.detach()


def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor, *,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``(B, C)`` of GroupNorm's affine weight and bias.

    ``dW_i[c] = sum_s xhat_i[c, s] g_i[c, s] = rstd_i[k] * (sum_s x g - mean_i[k] * sum_s g)`` for
    channel ``c`` in group ``k``: two reductions over the inputs, no normalised copy of them.
    ``stats``: the forward pass' ``(mean, rstd)`` per sample and group
    (:func:`group_norm_forward_stats`); recomputed from the inputs if None.
    """
    a = activations[0].to(backprops.dtype)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    b, c = backprops.shape[0], backprops.shape[1]
    g = backprops.reshape(b, c, -1)
    sum_g = g.sum(dim=2)
    if layer.weight is not None and layer.weight.requires_grad:
        groups = layer.num_groups
        if stats is None:
            var, mean = torch.var_mean(a.reshape(b, groups, -1), dim=2, unbiased=False)
            rstd = (var + layer.eps).rsqrt()
        else:
            mean, rstd = stats[0].to(g.dtype), stats[1].to(g.dtype)
        x = a.reshape(b * c, 1, -1)
        sum_xg = torch.bmm(x, g.reshape(b * c, -1, 1)).view(b, c)
        per_group = c // groups
        ret[layer.weight] = (rstd.repeat_interleave(per_group, dim=1)
                             * (sum_xg - mean.repeat_interleave(per_group, dim=1) * sum_g))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = sum_g
    return ret


def compute_group_norm_norm_sample(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of GroupNorm's affine parameters (materialised: C numbers each)."""
    return {p: gs.norm(2, dim=1) for p, gs in group_norm_grad_sample(layer, activations, backprops).items()}


# Registration in Opacus' own registry: Opacus' ghost clipping then handles these layers too.
register_norm_sampler(nn.Conv2d)(compute_conv2d_norm_sample)
register_norm_sampler(nn.GroupNorm)(compute_group_norm_norm_sample)
