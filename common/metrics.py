"""Classification metrics, per site and pooled across sites.

Sites never send scores or predictions. They send aggregate counts: a confusion matrix and,
per class, histograms of the predicted probability for examples of that class and of the
others. Pooled (global) metrics sum those counts across sites and compute the metric once,
rather than averaging per-site AUCs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIST_BINS = 100


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows = true class, columns = predicted class."""
    idx = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def auc_from_scores(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with mid-ranks for ties); NaN if a class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # mid-ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def score_histograms(labels: np.ndarray, probs: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """(C, 2, bins) counts: [c, 0] = p_c of examples of class c, [c, 1] = p_c of the others."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1]
    b = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    out = np.zeros((c, 2, bins), dtype=np.int64)
    for k in range(c):
        pos = labels == k
        out[k, 0] = np.bincount(b[pos, k], minlength=bins)
        out[k, 1] = np.bincount(b[~pos, k], minlength=bins)
    return out


def auc_from_histogram(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from binned scores: P(score_pos > score_neg) + 0.5 P(same bin)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


@dataclass(frozen=True)
class Summary:
    accuracy: float
    sensitivity: float
    specificity: float
    f1: float
    auc: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def summarise(cm: np.ndarray, auc: float) -> Summary:
    """Accuracy, sensitivity (recall), specificity, F1 from a confusion matrix.

    Binary: class 1 is the positive class. Multi-class: one-vs-rest, macro-averaged.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    acc = _safe_div(np.trace(cm), total)
    classes = [1] if cm.shape[0] == 2 else list(range(cm.shape[0]))
    sens, spec, f1 = [], [], []
    for k in classes:
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        sens.append(_safe_div(tp, tp + fn))
        spec.append(_safe_div(tn, tn + fp))
        f1.append(_safe_div(2 * tp, 2 * tp + fp + fn))
    return Summary(acc, float(np.mean(sens)), float(np.mean(spec)), float(np.mean(f1)), auc)


def macro_auc_from_histograms(hist: np.ndarray) -> float:
    hist = np.asarray(hist)
    if hist.shape[0] == 2:
        return auc_from_histogram(hist[1, 0], hist[1, 1])
    vals = [auc_from_histogram(hist[k, 0], hist[k, 1]) for k in range(hist.shape[0])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise_scores(labels: np.ndarray, probs: np.ndarray) -> Summary:
    """Exact metrics from per-example probabilities (used where the data is local)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    c = probs.shape[1]
    cm = confusion_matrix(labels, probs.argmax(1), c)
    if c == 2:
        auc = auc_from_scores(labels == 1, probs[:, 1])
    else:
        vals = [auc_from_scores(labels == k, probs[:, k]) for k in range(c)]
        vals = [v for v in vals if not np.isnan(v)]
        auc = float(np.mean(vals)) if vals else float("nan")
    return summarise(cm, auc)


def pooled_summary(cms: list[np.ndarray], hists: list[np.ndarray]) -> Summary:
    """Global metrics from several sites' counts: sum the counts, then compute once."""
    cm = np.sum(np.stack(cms), axis=0)
    hist = np.sum(np.stack(hists), axis=0)
    return summarise(cm, macro_auc_from_histograms(hist))
