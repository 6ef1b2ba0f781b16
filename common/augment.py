"""Per-sample data augmentation, compatible with DP-SGD.

Each image in a batch gets its own random transform and no two images are mixed, so the
augmented batch is still a per-sample function of the data and Opacus' per-sample clipping and
accounting are unaffected. Implemented with ``affine_grid``/``grid_sample`` (no torchvision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AugmentationConfig


def augment_batch(x: torch.Tensor, cfg: AugmentationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return an augmented copy of ``x`` (N, C, H, W) in [0, 1]; ``x`` itself is not modified."""
    if not cfg.enabled or x.numel() == 0:
        return x
    n = x.shape[0]
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(dev) * (hi - lo) + lo

    out = x
    if cfg.hflip > 0:
        flip = (torch.rand(n, generator=generator) < cfg.hflip).to(dev)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if cfg.vflip > 0:
        flip = (torch.rand(n, generator=generator) < cfg.vflip).to(dev)
        out = torch.where(flip[:, None, None, None], out.flip(-2), out)
    if cfg.rotate_deg > 0 or cfg.shift > 0 or cfg.zoom > 0:
        angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
        scale = uniform(1.0 - cfg.zoom, 1.0 + cfg.zoom)
        tx = uniform(-cfg.shift, cfg.shift) * 2.0  # grid units span [-1, 1]
        ty = uniform(-cfg.shift, cfg.shift) * 2.0
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(out.dtype)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.brightness > 0 or cfg.contrast > 0:
        b = uniform(-cfg.brightness, cfg.brightness)[:, None, None, None]
        c = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)[:, None, None, None]
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * c + mean + b).clamp(0.0, 1.0)
    return out
