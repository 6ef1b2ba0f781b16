"""Patient-level train/val/test splits, stratified by label, seeded.

All images of one patient (by salted patient hash) go to the same split, so no patient is ever
in two splits. Patients are stratified by their most frequent label; within each stratum they
are shuffled (seeded; independent of file order) and each is given to the split furthest
below its target share of that stratum's images. When a split with a non-zero fraction would
be empty but another split holds two or more patients, the smallest patient moves there.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def patient_splits(
    patients: Sequence[str],
    labels: Sequence[int],
    fractions: tuple[float, float, float],
    *,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices (sorted, int64) of the images of each split; ``patients[i]`` owns image ``i``."""
    if len(patients) != len(labels):
        raise ValueError(f"{len(patients)} patients but {len(labels)} labels")
    images: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        images[p].append(i)
    majority = {p: Counter(labels[i] for i in idx).most_common(1)[0][0] for p, idx in images.items()}
    strata: dict[int, list[str]] = defaultdict(list)
    for p in sorted(images):
        strata[majority[p]].append(p)
    frac = np.asarray(fractions, dtype=np.float64)
    assign: dict[str, int] = {}
    for label in sorted(strata):
        members = strata[label]
        rng = np.random.default_rng(_stratum_seed(seed, label))
        order = rng.permutation(len(members))
        total = sum(len(images[members[j]]) for j in order)
        filled = np.zeros(3)
        for j in order:
            p = members[j]
            deficit = np.where(frac > 0, frac * total - filled, -np.inf)
            k = int(np.argmax(deficit))
            assign[p] = k
            filled[k] += len(images[p])
    _fill_empty(assign, images, frac)
    out = {name: [] for name in SPLITS}  # type: dict[str, list[int]]
    for p, k in assign.items():
        out[SPLITS[k]].extend(images[p])
    return {name: np.asarray(sorted(v), dtype=np.int64) for name, v in out.items()}


def _stratum_seed(seed: int, label: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:8], "little")


def _fill_empty(assign: dict[str, int], images: dict[str, list[int]], frac: np.ndarray) -> None:
    for k in range(3):
        if frac[k] <= 0 or any(v == k for v in assign.values()):
            continue
        counts = Counter(assign.values())
        donors = [d for d in range(3) if counts.get(d, 0) >= 2]
        if not donors:
            return
        donor = max(donors, key=lambda d: counts[d])
        smallest = min((p for p, v in assign.items() if v == donor), key=lambda p: (len(images[p]), p))
        assign[smallest] = k
