"""In-memory (or memory-mapped) image sets and their splits: the one data interface of fedrad.

Every data source (MedMNIST-style ``.npz`` archives, a hospital's DICOM cache) produces a
:class:`SiteData`; training and evaluation only ever see :class:`ImageSplit` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class ImageSplit:
    """``images``: float32 (N, C, H, W) in [0, 1] (may be a read-only memmap); ``labels``: int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(len(self.labels))

    def subset(self, idx: np.ndarray) -> "ImageSplit":
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        return ImageSplit(images=np.asarray(self.images[idx]), labels=np.asarray(self.labels[idx]))

    def label_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()


@dataclass(frozen=True)
class SiteData:
    train: ImageSplit
    val: ImageSplit
    class_names: tuple[str, ...]
    test: ImageSplit | None = None
    #: Free-form description of where the data came from (never PHI).
    origin: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])


def _to_split(images: np.ndarray, labels: np.ndarray, *, channels: int, image_size: int, source: str) -> ImageSplit:
    x = np.asarray(images)
    if x.ndim == 3:  # (N, H, W) greyscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C)
        x = np.transpose(x, (0, 3, 1, 2))
    if x.ndim != 4:
        raise DataError(f"{source}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
    x = x.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, channels, axis=1)
        elif channels == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise DataError(f"{source}: cannot turn {x.shape[1]} channels into {channels}")
    if x.shape[2] != image_size or x.shape[3] != image_size:
        import torch
        import torch.nn.functional as F

        x = F.interpolate(torch.from_numpy(x), size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x.clamp_(0, 1).numpy()
    y = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64)
    return ImageSplit(images=np.ascontiguousarray(x), labels=y)


def load_npz(path: str | Path, *, channels: int = 1, image_size: int = 28) -> dict[str, ImageSplit]:
    """Load a MedMNIST-style archive (``{train,val,test}_{images,labels}``) into splits."""
    p = Path(path)
    try:
        archive = np.load(p)
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz archive ({exc})") from None
    with archive:
        splits = {}
        for name in ("train", "val", "test"):
            ki, kl = f"{name}_images", f"{name}_labels"
            if ki not in archive or kl not in archive:
                raise DataError(f"{p}: missing arrays {ki!r}/{kl!r} (has {sorted(archive.files)})")
            splits[name] = _to_split(archive[ki], archive[kl], channels=channels, image_size=image_size, source=str(p))
    return splits


def npz_source_path(path: str | None) -> Path:
    """The archive a study's ``data.path`` names, or the bundled PneumoniaMNIST when it names none."""
    from fedrad import bundled_path

    return Path(path) if path else bundled_path("data", "pneumoniamnist.npz")
