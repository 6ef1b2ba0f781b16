"""Data partitioning (common/partition.py) and per-sample augmentation (common/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrad.common.augment import augment_batch
from fedrad.common.config import AugmentationConfig
from fedrad.common.errors import DataError
from fedrad.common.partition import partition_indices

LABELS = np.repeat([0, 1, 2], [300, 200, 100])


# ------------------------------------------------------------------ partition
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_covering_and_sorted(scheme: str) -> None:
    parts = partition_indices(LABELS, num_parts=4, scheme=scheme, alpha=0.5, seed=1, min_per_part=10)

    allidx = np.concatenate(parts)
    assert len(parts) == 4
    assert len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    assert all(len(p) >= 10 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_seeded(scheme: str) -> None:
    a = partition_indices(LABELS, num_parts=3, scheme=scheme, seed=5)
    b = partition_indices(LABELS, num_parts=3, scheme=scheme, seed=5)
    c = partition_indices(LABELS, num_parts=3, scheme=scheme, seed=6)

    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_parts_are_near_equal() -> None:
    parts = partition_indices(LABELS, num_parts=7, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label mix and the global mix."""
    glob = np.bincount(LABELS, minlength=3) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=3) / len(p) - glob).sum() for p in parts]))


def test_small_alpha_dirichlet_is_label_skewed() -> None:
    skewed = [_label_skew(partition_indices(LABELS, num_parts=4, alpha=0.1, seed=s, min_per_part=5)) for s in range(5)]
    iid = [_label_skew(partition_indices(LABELS, num_parts=4, scheme="iid", seed=s)) for s in range(5)]
    flat = [_label_skew(partition_indices(LABELS, num_parts=4, alpha=1000.0, seed=s)) for s in range(5)]

    assert np.mean(skewed) > 0.25
    assert np.mean(iid) < 0.08
    assert np.mean(flat) < 0.08
    assert np.mean(skewed) > 3 * np.mean(iid)


def test_min_per_part_enforced_by_redrawing() -> None:
    for seed in range(5):
        parts = partition_indices(LABELS, num_parts=5, alpha=0.3, seed=seed, min_per_part=60)
        assert min(len(p) for p in parts) >= 60


def test_min_per_part_impossible_is_data_error() -> None:
    with pytest.raises(DataError, match="cannot give"):
        partition_indices(LABELS, num_parts=10, seed=0, min_per_part=61)
    with pytest.raises(DataError, match="could not draw"):
        # feasible in count, but alpha this small almost never gives every part 110
        partition_indices(LABELS, num_parts=5, alpha=0.01, seed=0, min_per_part=110)


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(DataError):
        partition_indices(LABELS, num_parts=0)
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition_indices(LABELS, num_parts=2, scheme="round-robin")


# ------------------------------------------------------------------ augmentation
FULL = AugmentationConfig(hflip=0.5, vflip=0.5, rotate_deg=20, shift=0.1, zoom=0.1, brightness=0.2, contrast=0.2)


def _batch(n: int = 6, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_disabled_config_returns_input_unchanged() -> None:
    x = _batch()

    out = augment_batch(x, AugmentationConfig(), torch.Generator().manual_seed(0))

    assert not AugmentationConfig().enabled
    assert out is x


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range_preserved_and_input_untouched(channels: int) -> None:
    x = _batch(c=channels)
    original = x.clone()

    out = augment_batch(x, FULL, torch.Generator().manual_seed(1))

    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(x, original)
    assert not torch.allclose(out, x)


def test_empty_batch() -> None:
    x = torch.zeros(0, 1, 16, 16)
    assert augment_batch(x, FULL, torch.Generator().manual_seed(0)).shape == x.shape


def test_same_seed_same_output() -> None:
    x = _batch()
    a = augment_batch(x, FULL, torch.Generator().manual_seed(3))
    b = augment_batch(x, FULL, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cfg",
    [FULL, AugmentationConfig(brightness=0.3, contrast=0.3), AugmentationConfig(rotate_deg=30, zoom=0.2)],
)
def test_changing_one_sample_does_not_change_the_others(cfg: AugmentationConfig) -> None:
    """Per-sample: image i's augmentation depends only on image i (and the RNG), never on the batch."""
    x = _batch(8)
    y = x.clone()
    y[3] = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(99))

    ax = augment_batch(x, cfg, torch.Generator().manual_seed(11))
    ay = augment_batch(y, cfg, torch.Generator().manual_seed(11))

    others = [i for i in range(8) if i != 3]
    assert torch.allclose(ax[others], ay[others], atol=0, rtol=0)
    assert not torch.allclose(ax[3], ay[3])


def test_hflip_probability_one_is_exact_flip() -> None:
    x = _batch()
    out = augment_batch(x, AugmentationConfig(hflip=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-1))


def test_vflip_probability_one_is_exact_flip() -> None:
    x = _batch()
    out = augment_batch(x, AugmentationConfig(vflip=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-2))


def test_identity_affine_is_near_identity() -> None:
    # rotate_deg tiny: the bilinear resample of an (almost) identity grid reproduces the image
    x = _batch()
    out = augment_batch(x, AugmentationConfig(rotate_deg=1e-6), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-4)
