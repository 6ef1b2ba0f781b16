"""Small building blocks shared by the models."""

from __future__ import annotations

from torch import nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides ``channels``.

    GroupNorm normalises within one sample, so per-sample gradients stay per-sample (DP-SGD
    needs that; BatchNorm mixes samples and Opacus rejects it).
    """
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def conv_gn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        group_norm(cout),
        nn.ReLU(inplace=False),
    )
