"""DP-SGD engine: per-sample clipping without per-sample gradients where that is cheaper.

- :mod:`.norm_samplers`: Conv2d and GroupNorm norm samplers, registered in Opacus' own registry
  (importing this package makes Opacus' ``grad_sample_mode="ghost"`` handle fedrad's models);
- :mod:`.mixed`: per layer, ghost norm or materialised per-sample gradient by cost (mixed ghost
  clipping), and the clipped sum without a second backward pass (book-keeping);
- :mod:`.step`: :func:`make_dp_step`, one DP-SGD step with Opacus' clipping and noise semantics.
"""

from __future__ import annotations

from fedrad.client.training.dp_engine import norm_samplers as norm_samplers  # registers the norm samplers with Opacus
from fedrad.client.training.dp_engine.mixed import MODES, Mode
from fedrad.client.training.dp_engine.step import DPStep, make_dp_step, per_sample_cross_entropy

__all__ = ["MODES", "DPStep", "Mode", "make_dp_step", "norm_samplers", "per_sample_cross_entropy"]
