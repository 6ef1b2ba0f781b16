"""Evaluate a model on an :class:`ImageSplit`: loss, aggregate counts and metrics.

Used by the hospital (on its validation data: only :attr:`EvalStats.histograms` and
:attr:`EvalStats.num_examples` may leave it, DP-released) and by the coordinator (on a held-out
test split it owns, in simulation and benchmarks: not private, so the exact metrics are used).
Returns counts and summaries, never per-example outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .datasets import ImageSplit
from .metrics import Summary, confusion_matrix, score_histograms, summarise_scores


@dataclass(frozen=True)
class EvalStats:
    """``histograms``: int64 (C, 2, HIST_BINS), layout in :mod:`fedrad.common.metrics`.
    ``summary`` and ``confusion``: exact, at ``threshold`` (binary, p(class 1) >= threshold) when
    one was given, else at the argmax."""

    loss: float
    num_examples: int
    confusion: np.ndarray
    histograms: np.ndarray
    summary: Summary
    threshold: float | None = None

    def test_metrics(self) -> dict[str, float | int | None]:
        """The coordinator's record of a test-split evaluation (metrics.json ``global_test``)."""
        return {"loss": self.loss, **self.summary.as_dict(), "threshold": self.threshold,
                "num_examples": self.num_examples}


@torch.no_grad()
def predict_proba(model: nn.Module, split: ImageSplit, *, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities in float64 (so saturated scores keep their logit resolution)."""
    model.to(device).eval()
    out = []
    for i in range(0, len(split), batch_size):
        x = torch.from_numpy(np.array(split.images[i : i + batch_size], dtype=np.float32)).to(device)
        out.append(torch.softmax(model(x).double(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def evaluate(model: nn.Module, split: ImageSplit, *, device: torch.device, batch_size: int = 256,
             threshold: float | None = None) -> EvalStats:
    probs = predict_proba(model, split, device=device, batch_size=batch_size)
    labels = np.asarray(split.labels, dtype=np.int64)
    c = probs.shape[1]
    p_true = probs[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)
    loss = float(-np.mean(np.log(np.clip(p_true, 1e-12, None)))) if len(labels) else float("nan")
    rule = threshold if c == 2 else None
    preds = (probs[:, 1] >= rule).astype(np.int64) if rule is not None else probs.argmax(1)
    return EvalStats(
        loss=loss,
        num_examples=len(labels),
        confusion=confusion_matrix(labels, preds, c),
        histograms=score_histograms(labels, probs),
        summary=summarise_scores(labels, probs, threshold=rule),
        threshold=rule,
    )
