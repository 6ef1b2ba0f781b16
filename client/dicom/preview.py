"""A PNG contact sheet of preprocessed images: one row per class, a few images each.

Lets a hospital's operator check windowing, inversion, cropping and labels by eye before
training. The sheet shows pixels and class names only (no identifiers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedrad.common.datasets import ImageSplit, SiteData

log = logging.getLogger(__name__)


def write_preview(
    data: SiteData | ImageSplit,
    out_path: str | Path,
    *,
    class_names: tuple[str, ...] | None = None,
    per_class: int = 8,
    seed: int = 0,
) -> Path:
    """Write the contact sheet of ``data`` (a site: its training split) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(data, SiteData):
        split, names = data.train, data.class_names
    else:
        split, names = data, class_names or tuple(f"class-{k}" for k in range(int(data.labels.max(initial=0)) + 1))
    rng = np.random.default_rng(seed)
    rows = []
    for k, name in enumerate(names):
        idx = np.flatnonzero(split.labels == k)
        pick = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)) if len(idx) else idx
        rows.append((name, len(idx), pick))
    n_rows, n_cols = max(1, len(rows)), max(1, per_class)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows), squeeze=False)
    for r, (name, count, pick) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pick):
                img = np.asarray(split.images[pick[c]], dtype=np.float32)
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.imshow(np.clip(np.moveaxis(img, 0, -1), 0, 1))
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(f"{name}\n(n={count})", fontsize=9)
    fig.suptitle(f"{len(split)} preprocessed images, {split.images.shape[1]}x{split.images.shape[2]}x{split.images.shape[3]}")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    log.info("wrote a preview of %d classes", len(rows))
    return out
