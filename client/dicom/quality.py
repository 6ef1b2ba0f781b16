"""The quality gate after preprocessing: images that carry no picture are not training data.

A preprocessed image (float32 in [0, 1]) whose values are all the same (``constant image``)
or nearly so (``near-constant image``: standard deviation under :data:`NEAR_CONSTANT_STD`,
i.e. about one grey level of 8 bits) is skipped with that reason. Windows that lie outside the
data are handled earlier, in :mod:`.decode` (percentile windowing, with a note), and objects
that are not images are refused by SOP Class (:mod:`.sop`).
"""

from __future__ import annotations

import numpy as np

CONSTANT = "constant image"
NEAR_CONSTANT = "near-constant image"
#: Largest spread (max - min) of a constant image.
CONSTANT_PTP = 1e-4
#: Standard deviation below which an image is near-constant (about 1/255).
NEAR_CONSTANT_STD = 1.0 / 255.0


def gate_reason(image: np.ndarray) -> str | None:
    """None when ``image`` (any shape, values in [0, 1]) may be used, else the skip reason."""
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0 or float(np.ptp(values)) <= CONSTANT_PTP:
        return CONSTANT
    if float(values.std()) < NEAR_CONSTANT_STD:
        return NEAR_CONSTANT
    return None


def is_flat(values: np.ndarray) -> bool:
    """True when an intermediate image (any range) holds a single value."""
    return values.size == 0 or float(np.ptp(values)) == 0.0
