"""Evaluate a model on an :class:`ImageSplit`: loss, aggregate counts and metrics.

Used by the hospital (on its validation data) and by the coordinator (on a held-out test set
it owns, in simulation and benchmarks). Returns counts, never per-example outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import ImageSplit
from .metrics import Summary, confusion_matrix, score_histograms, summarise_scores


@dataclass(frozen=True)
class EvalStats:
    loss: float
    num_examples: int
    confusion: np.ndarray
    histograms: np.ndarray
    summary: Summary


@torch.no_grad()
def predict_proba(model: nn.Module, split: ImageSplit, *, device: torch.device, batch_size: int = 256) -> np.ndarray:
    model.to(device).eval()
    out = []
    for i in range(0, len(split), batch_size):
        x = torch.from_numpy(np.array(split.images[i : i + batch_size], dtype=np.float32)).to(device)
        out.append(torch.softmax(model(x), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def evaluate(model: nn.Module, split: ImageSplit, *, device: torch.device, batch_size: int = 256) -> EvalStats:
    probs = predict_proba(model, split, device=device, batch_size=batch_size)
    labels = np.asarray(split.labels, dtype=np.int64)
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(labels)))
    c = probs.shape[1]
    return EvalStats(
        loss=loss,
        num_examples=len(labels),
        confusion=confusion_matrix(labels, probs.argmax(1), c),
        histograms=score_histograms(labels, probs),
        summary=summarise_scores(labels, probs),
    )
