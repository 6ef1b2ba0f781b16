"""The classic CNN of the seed papers: conv blocks, pooling, flatten, dense layers, softmax output.

The network returns logits; the softmax is applied by the loss (cross-entropy) and by
:func:`fedrad.common.models.predict.predict_proba` at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_gn_relu
from .registry import register_model


class ClassicCNN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        widths: tuple[int, ...] | list[int] = (32, 64, 128),
        dense: int = 128,
        dropout: float = 0.25,
        weight_standardization: bool = False,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one conv block")
        side = image_size
        for _ in widths:
            side = (side + 1) // 2  # ceil-mode pooling: 28 -> 14 -> 7 -> 4
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} pooling blocks")
        blocks: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            ws = weight_standardization
            blocks += [conv_gn_relu(cin, w, weight_standardization=ws), conv_gn_relu(w, w, weight_standardization=ws),
                       nn.MaxPool2d(2, ceil_mode=True)]
            cin = w
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, dense),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("cnn")
def classic_cnn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    widths: tuple[int, ...] | list[int] = (32, 64, 128),
    dense: int = 128,
    dropout: float = 0.25,
    weight_standardization: bool = False,
) -> nn.Module:
    """Conv-GN-ReLU x2 + max-pool per block, then dense layers (``weight_standardization``: WSConv2d)."""
    return ClassicCNN(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        widths=tuple(widths),
        dense=dense,
        dropout=dropout,
        weight_standardization=weight_standardization,
    )
