"""Small building blocks shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from ..errors import ModelError


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides ``channels``.

    GroupNorm normalises within one sample, so per-sample gradients stay per-sample (DP-SGD
    needs that; BatchNorm mixes samples and Opacus rejects it).
    """
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019; De et al. 2022 pair it with GroupNorm for DP).

    The convolution uses ``(w - mean) / sqrt(var + eps)`` per output channel (mean and biased variance over
    the fan-in) instead of ``w``. Per-sample gradients: Opacus' hooks engine and fedrad's mixed engine use
    :func:`ws_conv2d_grad_sample` (registered below); ``functorch`` differentiates this forward directly.
    Opacus' ``ew`` engine (ExpandedWeights) cannot (it handles only plain conv/linear/norm calls on a
    weight): the forward refuses it with a :class:`ModelError` rather than compute something else.
    """

    eps: float = 1e-5

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.groups != 1 or isinstance(self.padding, str) or self.padding_mode != "zeros":
            raise ValueError("WSConv2d supports groups=1, numeric padding and padding_mode='zeros' only")

    def standardized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.weight).__name__ == "ExpandedWeight":
            raise ModelError("weight standardisation needs privacy.grad_sample_mode 'hooks' or 'functorch' "
                             "(Opacus' 'ew' engine cannot differentiate it per sample)")
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


@register_grad_sampler(WSConv2d)
def ws_conv2d_grad_sample(layer: WSConv2d, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a :class:`WSConv2d`: the convolution's per-sample gradient with respect to the
    standardised weight, pulled back through the standardisation (a fixed linear map per output channel:
    ``(g - mean(g) - w_hat * mean(g * w_hat)) / sigma``)."""
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    w = layer.weight
    cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    g = backprops.reshape(n, backprops.shape[1], -1)  # (n, p, T)
    gs = torch.einsum("npt,ndt->npd", g, cols)  # (n, p, D): gradient w.r.t. the standardised weight
    flat = w.detach().reshape(1, w.shape[0], -1)
    var, mean = torch.var_mean(flat, dim=2, keepdim=True, unbiased=False)
    sigma = torch.sqrt(var + layer.eps)
    w_hat = (flat - mean) / sigma
    gw = (gs - gs.mean(dim=2, keepdim=True) - w_hat * (gs * w_hat).mean(dim=2, keepdim=True)) / sigma
    out: dict[nn.Parameter, torch.Tensor] = {w: gw.reshape(n, *w.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2)
    return out


def conv_gn_relu(cin: int, cout: int, stride: int = 1, *, weight_standardization: bool = False) -> nn.Sequential:
    conv = WSConv2d if weight_standardization else nn.Conv2d
    return nn.Sequential(
        conv(cin, cout, 3, stride=stride, padding=1, bias=False),
        group_norm(cout),
        nn.ReLU(inplace=False),
    )


__all__ = ["ModelError", "WSConv2d", "conv_gn_relu", "group_norm", "ws_conv2d_grad_sample"]
