"""Saliency maps for the model's predictions, computed on the node (nothing about them is sent anywhere).

Two methods, torch only (Captum and MONAI would be new dependencies for ~60 lines of code):

* :func:`grad_cam`: Grad-CAM (Selvaraju et al., 2017) on the last convolutional block
  (:func:`target_layer`): the block's activations weighted by the spatially averaged gradient of
  the target class's score, summed over channels, ReLU, upsampled (bilinear) to the image size.
  The score is the target's logit minus the mean logit (its evidence *against the other
  classes*; for two classes, half the log-odds): with the raw logit, a quarter of a briefly
  trained binary model's maps came out all zero (every channel weighted negatively).
  A map can still be all zero: no region of the last block raises the class's score (typical of
  a "normal" decision, whose evidence is the absence of findings). Such maps are returned as
  zeros and marked on the contact sheet ("no positive evidence"), never rescaled into noise.
* :func:`integrated_gradients`: integrated gradients (Sundararajan et al., 2017), midpoint Riemann
  sum over ``steps`` points; attributions satisfy completeness (they sum to
  logit(x) - logit(baseline), up to the quadrature error). The baseline is the image blurred
  (:func:`blur`; "blur integrated gradients"), not black: fedrad's models start with a bias-free
  convolution followed by GroupNorm, which makes them (almost) invariant to the input's scale, so
  on the straight path from a black image all change happens within about 1e-3 of black and a
  Riemann sum misses it.

:func:`write_contact_sheets` overlays the maps on the preprocessed images (PNG pages), titled with
the image id, the probability of the explained class and the true label when known.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrad.common.errors import DataError, ModelError

log = logging.getLogger(__name__)

METHODS = ("gradcam", "ig")
PER_PAGE = 8


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: ``features``' last conv block (cnn), ``stages[-1]`` (resnet),
    else the last module holding a Conv2d whose parent is a container."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        blocks = [m for m in features if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        if blocks:
            return blocks[-1]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential) and len(stages):
        return stages[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError("Grad-CAM needs a convolutional model (no Conv2d layer found)")
    return convs[-1]


def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images.float()
    if x.ndim != 4:
        raise DataError(f"images must be (N, C, H, W), got {tuple(x.shape)}")
    return x


def _targets(model: nn.Module, x: torch.Tensor, target: Sequence[int] | np.ndarray | None) -> torch.Tensor:
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    t = torch.as_tensor(np.asarray(target, dtype=np.int64))
    if t.shape != (len(x),):
        raise DataError(f"target must hold one class per image ({len(x)}), got shape {tuple(t.shape)}")
    return t


def grad_cam(model: nn.Module, images: np.ndarray | torch.Tensor, *, target: Sequence[int] | np.ndarray | None = None,
             layer: nn.Module | None = None) -> np.ndarray:
    """(N, H, W) Grad-CAM maps in [0, 1] (each map divided by its maximum; all-zero maps stay 0)."""
    model.eval()
    x = _as_tensor(images)
    t = _targets(model, x, target)
    layer = layer or target_layer(model)
    saved: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            act = saved[-1]
            score = (logits.gather(1, t[:, None])[:, 0] - logits.mean(1)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values
    empty = int((peak <= 0).sum())
    if empty:
        log.info("Grad-CAM: %d of %d maps show no positive evidence at the last convolutional block", empty, len(x))
    return (cam / peak.clamp_min(1e-12)[:, None, None]).detach().numpy().astype(np.float32)


def blur(images: np.ndarray | torch.Tensor, *, sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur (reflect padding) of (N, C, H, W) images; ``sigma`` default: image size / 8."""
    x = _as_tensor(images)
    sigma = float(sigma if sigma is not None else max(x.shape[-1], x.shape[-2]) / 8.0)
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def integrated_gradients(model: nn.Module, images: np.ndarray | torch.Tensor, *,
                         target: Sequence[int] | np.ndarray | None = None, baseline: torch.Tensor | None = None,
                         steps: int = 32, batch_size: int = 256) -> np.ndarray:
    """(N, C, H, W) integrated-gradients attributions of the target class's logit (baseline: :func:`blur`)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    model.eval()
    x = _as_tensor(images)
    t = _targets(model, x, target)
    base = blur(x) if baseline is None else baseline.expand_as(x).float()
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros_like(x)
    per = max(1, batch_size // steps)
    for i in range(0, len(x), per):
        xi, bi, ti = x[i : i + per], base[i : i + per], t[i : i + per]
        path = bi[None] + alphas[:, None, None, None, None] * (xi - bi)[None]  # (steps, n, C, H, W)
        path = path.reshape(-1, *x.shape[1:]).requires_grad_(True)
        with torch.enable_grad():
            logits = model(path)
            score = logits.gather(1, ti.repeat(steps)[:, None]).sum()
            (g,) = torch.autograd.grad(score, path)
        total[i : i + per] = g.reshape(steps, len(xi), *x.shape[1:]).mean(0)
    return ((x - base) * total).detach().numpy().astype(np.float32)


def ig_map(attributions: np.ndarray) -> np.ndarray:
    """(N, H, W) display map in [0, 1]: |attribution| summed over channels, divided by its maximum."""
    m = np.abs(attributions).sum(axis=1)
    peak = m.reshape(len(m), -1).max(axis=1).clip(min=1e-12)[:, None, None]
    return (m / peak).astype(np.float32)


def saliency(model: nn.Module, images: np.ndarray, method: str, *, target: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) map in [0, 1] by ``method`` (``gradcam`` or ``ig``)."""
    if method == "gradcam":
        return grad_cam(model, images, target=target)
    if method == "ig":
        return ig_map(integrated_gradients(model, images, target=target))
    raise DataError(f"unknown explanation method {method!r} (known: {', '.join(METHODS)})")


@dataclass(frozen=True)
class Explained:
    """One explained image: its id, the explained class, its probability and the true label (or None)."""

    image_id: str
    target: int
    probability: float
    true_label: int | None


def write_contact_sheets(out_dir: Path, images: np.ndarray, maps: dict[str, np.ndarray], items: Sequence[Explained],
                         class_names: Sequence[str], *, per_page: int = PER_PAGE, stem: str = "explain") -> list[Path]:
    """PNG pages: per image, the preprocessed image and each map overlaid on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"gradcam": "Grad-CAM", "ig": "integrated gradients"}
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = []
    for start in range(0, len(items), per_page):
        chunk = list(range(start, min(start + per_page, len(items))))
        cols = 1 + len(maps)
        fig, axes = plt.subplots(len(chunk), cols, figsize=(2.3 * cols, 2.5 * len(chunk)), squeeze=False)
        for r, i in enumerate(chunk):
            img = np.asarray(images[i], dtype=np.float32)
            grey = img[0] if img.shape[0] == 1 else img.mean(0)
            it = items[i]
            truth = "unknown" if it.true_label is None else class_names[it.true_label]
            axes[r][0].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[r][0].set_title(f"{it.image_id}\np({class_names[it.target]})={it.probability:.3f}\ntrue: {truth}",
                                 fontsize=7)
            for c, (name, m) in enumerate(maps.items(), start=1):
                axes[r][c].imshow(grey, cmap="gray", vmin=0, vmax=1)
                axes[r][c].imshow(m[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                empty = name == "gradcam" and float(np.max(m[i])) <= 0.0
                axes[r][c].set_title(titles.get(name, name) + ("\n(no positive evidence)" if empty else ""), fontsize=7)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        path = out_dir / f"{stem}-{start // per_page + 1:02d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        pages.append(path)
    return pages


def explain_images(model: nn.Module, images: np.ndarray, *, methods: Sequence[str] = METHODS,
                   target: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Maps per method, the explained class per image (the predicted one unless given) and its probability."""
    x = _as_tensor(images)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    t = probs.argmax(1) if target is None else np.asarray(target, dtype=np.int64)
    maps = {m: saliency(model, images, m, target=t) for m in methods}
    return maps, t, probs[np.arange(len(t)), t]
