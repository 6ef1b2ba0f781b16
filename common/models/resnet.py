"""ResNet with GroupNorm (ResNet-18 layout by default), sized for small medical images."""

from __future__ import annotations

import torch
from torch import nn

from .layers import WSConv2d, group_norm
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: type[nn.Conv2d] = nn.Conv2d) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetGN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        large_input_stem: bool = False,
        weight_standardization: bool = False,
    ) -> None:
        super().__init__()
        conv: type[nn.Conv2d] = WSConv2d if weight_standardization else nn.Conv2d
        if large_input_stem:  # ImageNet-style stem for >= 128 px inputs
            self.stem = nn.Sequential(
                conv(in_channels, width, 7, stride=2, padding=3, bias=False),
                group_norm(width),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:  # small images (28-64 px): 3x3 stem, no early down-sampling
            self.stem = nn.Sequential(
                conv(in_channels, width, 3, padding=1, bias=False), group_norm(width), nn.ReLU(inplace=False)
            )
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * (2**i)
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1, conv=conv))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register_model("resnet")
def resnet_gn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: int = 16,
    blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
    weight_standardization: bool = False,
) -> nn.Module:
    """ResNet-18 layout (2-2-2-2 basic blocks) with GroupNorm; ``width=64`` gives the ~11M-param original.
    ``weight_standardization``: every convolution a :class:`~.layers.WSConv2d`."""
    if width < 4 or width % 4:
        raise ValueError(f"width must be a positive multiple of 4 (got {width})")
    return ResNetGN(
        in_channels=in_channels,
        num_classes=num_classes,
        width=width,
        blocks=tuple(blocks),
        large_input_stem=image_size >= 128,
        weight_standardization=weight_standardization,
    )


@register_model("resnet18")
def resnet18_gn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The full-width ResNet-18 (about 11.2M parameters) with GroupNorm."""
    return resnet_gn(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=64)
