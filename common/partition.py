"""Split one labelled set into per-hospital shares (IID or label-skewed non-IID), seeded."""

from __future__ import annotations

import numpy as np

from .errors import DataError


def partition_indices(
    labels: np.ndarray, *, num_parts: int, scheme: str = "dirichlet", alpha: float = 1.0, seed: int = 0,
    min_per_part: int = 1,
) -> list[np.ndarray]:
    """Return ``num_parts`` disjoint, sorted index arrays covering ``labels``.

    ``dirichlet``: for each class, its examples are split across parts by proportions drawn from
    Dir(alpha) (smaller alpha = more skew), redrawn until every part has ``min_per_part``
    examples. ``iid``: a seeded shuffle cut into near-equal parts.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if num_parts < 1:
        raise DataError(f"num_parts must be >= 1, got {num_parts}")
    if n < num_parts * min_per_part:
        raise DataError(f"{n} examples cannot give {num_parts} hospitals at least {min_per_part} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_parts)]
    if scheme != "dirichlet":
        raise DataError(f"unknown partition scheme {scheme!r} (known: iid, dirichlet)")
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_part:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"could not draw a Dirichlet(alpha={alpha}) partition giving every one of {num_parts} hospitals "
        f">= {min_per_part} examples; raise alpha or lower min_per_hospital"
    )
