"""Classification metrics: exact ones from scores (where the data is local) and every validation
figure from binned score histograms (what hospitals send).

Hospitals never send scores, predictions, losses or confusion matrices. They send one aggregate:
per class ``k`` the histogram of the model's score for class ``k``, split by whether the true label
is ``k`` (``hist[k, t, b]``, ``t = 1`` if the label is ``k``), DP-noised on the node. Everything the
coordinator reports about validation (AUC, loss, the operating threshold and the sensitivity,
specificity and accuracy at it) is post-processing of those counts, per site or pooled (counts
summed over sites, the metric computed once).

Noisy counts arrive signed (issue 10): a site rounds its noisy counts but does not clip them, so
an empty cell is centred on 0 and the sum over many sites stays unbiased. Every figure here clips
its input at 0 itself (post-processing): per site that is the display of one noisy histogram; for
the pool, :func:`pool_histograms` sums the signed counts first, so the clip comes after pooling.

Bins are logit-spaced (see :data:`BIN_EDGES`): ``HIST_BINS - 2`` bins of the score's logit
``z = log(p / (1 - p))`` over ``[-LOGIT_LIMIT, LOGIT_LIMIT]`` plus two open end bins
``(-inf, -LOGIT_LIMIT)`` and ``[LOGIT_LIMIT, inf)``. The interior edges are equally spaced in
``asinh(z / LOGIT_SCALE)``: about 0.31 logit units wide around p = 0.5 (an untrained or heavily
noised model's scores stay near there, and wide central bins would bias its AUC towards 0.5),
widening to about 1.4 units near the limits. A trained model's scores crowd near 0 and 1, where
equal-width probability bins put everything into one bin (pooled AUC 0.5 although the model
separates the classes); here p = 0.99 (z = 4.6), 0.999 (6.9), 0.9999 (9.2) and 0.99999 (11.5, open
end bin) all land in different bins. ``HIST_BINS`` is kept modest because every bin is noised on
the node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Number of score bins per (class, label) slice of a histogram.
HIST_BINS = 32
#: Interior bins cover logit(p) in [-LOGIT_LIMIT, LOGIT_LIMIT] (p in [4.5e-5, 0.999955]).
LOGIT_LIMIT = 10.0
#: Edges are equally spaced in asinh(z / LOGIT_SCALE) (dense near z = 0, wider in the tails).
LOGIT_SCALE = 2.0
_U = np.linspace(-np.arcsinh(LOGIT_LIMIT / LOGIT_SCALE), np.arcsinh(LOGIT_LIMIT / LOGIT_SCALE), HIST_BINS - 1)
#: The HIST_BINS - 1 finite bin edges in logit space, symmetric about 0; bin b holds
#: edges[b-1] <= z < edges[b] (bin 0: z < edges[0]; bin HIST_BINS-1: z >= edges[-1]).
BIN_EDGES = LOGIT_SCALE * np.sinh(_U)
BIN_EDGES = (BIN_EDGES - BIN_EDGES[::-1]) / 2  # exactly antisymmetric; the middle edge is p = 0.5
BIN_EDGES[0], BIN_EDGES[-1] = -LOGIT_LIMIT, LOGIT_LIMIT
#: Each bin's representative logit: interior bins the midpoint of their edges, end bins as far
#: beyond the limit as the half-width of their neighbour. Used for the approximate loss.
_END = (BIN_EDGES[-1] - BIN_EDGES[-2]) / 2
BIN_CENTERS = np.concatenate([[BIN_EDGES[0] - _END], (BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2, [BIN_EDGES[-1] + _END]])


def nonnegative(hist: np.ndarray) -> np.ndarray:
    """The counts of a (possibly signed, noisy) histogram clipped at 0, as float64 (post-processing)."""
    return np.clip(np.asarray(hist, dtype=np.float64), 0.0, None)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


#: The probability thresholds an operating point can take: the finite bin edges as probabilities.
THRESHOLDS = sigmoid(BIN_EDGES)


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64; p = 0 gives -inf, p = 1 gives +inf (both land in an end bin)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(p) - np.log1p(-p)


def bin_index(p: np.ndarray) -> np.ndarray:
    """The histogram bin of each probability (by its logit); NaN goes to bin 0."""
    z = logit(p)
    z = np.where(np.isnan(z), -np.inf, z)
    return np.searchsorted(BIN_EDGES, z, side="right").astype(np.int64)


# ------------------------------------------------------------------ exact metrics from scores
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


def _scores_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    c = probs.shape[1]
    if c == 2:
        return auc_from_scores(labels == 1, probs[:, 1])
    vals = [auc_from_scores(labels == k, probs[:, k]) for k in range(c)]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise_scores(labels: np.ndarray, probs: np.ndarray, *, threshold: float | None = None) -> Summary:
    """Exact metrics from per-example probabilities (used where the data is local).

    Binary with ``threshold``: positive iff p(class 1) >= threshold; otherwise the argmax.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1]
    if c == 2 and threshold is not None:
        preds = (probs[:, 1] >= threshold).astype(np.int64)
    else:
        preds = probs.argmax(1)
    return summarise(confusion_matrix(labels, preds, c), _scores_auc(labels, probs))


# ------------------------------------------------------------------ histograms (what a site sends)
def score_histograms(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C, 2, HIST_BINS) int64 counts: ``[k, 1]`` = bins of p_k for examples of class k,
    ``[k, 0]`` = bins of p_k for the others. Every example adds one count to each class slice."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1]
    out = np.zeros((c, 2, HIST_BINS), dtype=np.int64)
    for k in range(c):
        b = bin_index(probs[:, k])
        pos = labels == k
        out[k, 1] = np.bincount(b[pos], minlength=HIST_BINS)
        out[k, 0] = np.bincount(b[~pos], minlength=HIST_BINS)
    return out


def auc_from_histogram(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from binned scores: P(score_pos > score_neg) + 0.5 P(same bin); exact on the binned data.
    Negative (noisy) counts are clipped at 0."""
    pos, neg = nonnegative(pos), nonnegative(neg)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def macro_auc_from_histograms(hist: np.ndarray) -> float:
    """Binary: the AUC of class 1's score. C > 2: macro one-vs-rest AUC over classes present."""
    hist = np.asarray(hist)
    if hist.shape[0] == 2:
        return auc_from_histogram(hist[1, 1], hist[1, 0])
    vals = [auc_from_histogram(hist[k, 1], hist[k, 0]) for k in range(hist.shape[0])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def loss_from_histograms(hist: np.ndarray) -> float:
    """Approximate cross-entropy: every count of ``hist[k, 1]`` (an example of class k) costs
    -log p at its bin's representative probability (:data:`BIN_CENTERS`). Each example is counted
    once (in its own class's slice), so this approximates the categorical cross-entropy for any C."""
    hist = nonnegative(hist)
    own = hist[:, 1, :].sum(axis=0)
    n = own.sum()
    if n <= 0:
        return float("nan")
    neg_log_p = np.logaddexp(0.0, -BIN_CENTERS)  # -log(sigmoid(z)), stable
    return float((own * neg_log_p).sum() / n)


def num_examples_from_histograms(hist: np.ndarray) -> int:
    """Examples behind a histogram: max(0, the sum of class 0's signed slice). The noisy counts are
    summed unclipped (an unbiased total), then clipped (post-processing)."""
    return max(0, int(np.asarray(hist, dtype=np.int64)[0].sum()))


def _rates(hist: np.ndarray, edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (sensitivity, specificity) of "positive iff bin >= edge + 1"."""
    hist = nonnegative(hist)
    pos, neg = hist[:, 1, :], hist[:, 0, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = pos[:, edge + 1:].sum(1) / pos.sum(1)
        spec = neg[:, : edge + 1].sum(1) / neg.sum(1)
    return sens, spec


def _classes(hist: np.ndarray) -> list[int]:
    """Binary: class 1 is the positive class; C > 2: every class, one-vs-rest."""
    return [1] if np.asarray(hist).shape[0] == 2 else list(range(np.asarray(hist).shape[0]))


def choose_threshold(hist: np.ndarray, *, target_sensitivity: float | None = None) -> float | None:
    """Operating threshold on p(positive) chosen from (pooled) validation counts.

    Default: the bin edge maximising Youden's J = sensitivity + specificity - 1 (macro over
    classes one-vs-rest when C > 2; the middle one of equal maxima). With ``target_sensitivity``:
    the highest threshold whose sensitivity still reaches the target (the best specificity at that
    sensitivity). None when a class is missing from the counts (nothing to choose from).
    """
    hist = nonnegative(hist)
    ks = _classes(hist)
    if any(hist[k, 1].sum() <= 0 or hist[k, 0].sum() <= 0 for k in ks):
        return None
    sens = np.empty(len(THRESHOLDS))
    spec = np.empty(len(THRESHOLDS))
    for e in range(len(THRESHOLDS)):
        s, p = _rates(hist, e)
        sens[e], spec[e] = float(np.mean(s[ks])), float(np.mean(p[ks]))
    if target_sensitivity is not None:
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        ok = np.flatnonzero(sens >= target_sensitivity - 1e-12)
        return float(THRESHOLDS[ok.max()]) if ok.size else float(THRESHOLDS[0])
    j = sens + spec - 1.0
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(THRESHOLDS[best[len(best) // 2]])


def _edge_of(threshold: float) -> int:
    """Index of the bin edge a threshold stands for (thresholds between edges round down to one)."""
    z = float(logit(np.array(threshold)))
    return int(np.clip(np.searchsorted(BIN_EDGES, z + 1e-9, side="right") - 1, 0, len(BIN_EDGES) - 1))


@dataclass(frozen=True)
class BinnedSummary:
    """Validation figures from (possibly noisy) histograms. ``accuracy`` is None when C > 2 (it
    needs the argmax, which histograms do not hold); figures of a missing class are NaN."""

    auc: float
    loss: float
    threshold: float | None
    sensitivity: float
    specificity: float
    accuracy: float | None
    f1: float
    num_examples: int
    confusion: list[list[int]] | None  # binary only: [[TN, FP], [FN, TP]] at the threshold

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def at_threshold(hist: np.ndarray, threshold: float | None) -> dict[str, object]:
    """Sensitivity, specificity, F1 (macro one-vs-rest when C > 2), accuracy and the binary
    confusion matrix of "positive iff p >= threshold"; NaN/None everywhere without a threshold."""
    nan = float("nan")
    if threshold is None:
        return {"sensitivity": nan, "specificity": nan, "f1": nan, "accuracy": None, "confusion": None}
    hist = nonnegative(hist)
    e = _edge_of(threshold)
    ks = _classes(hist)
    sens, spec, f1 = [], [], []
    for k in ks:
        tp, fn = hist[k, 1, e + 1:].sum(), hist[k, 1, : e + 1].sum()
        fp, tn = hist[k, 0, e + 1:].sum(), hist[k, 0, : e + 1].sum()
        sens.append(_safe_div(tp, tp + fn))
        spec.append(_safe_div(tn, tn + fp))
        f1.append(_safe_div(2 * tp, 2 * tp + fp + fn))
    out: dict[str, object] = {"sensitivity": float(np.mean(sens)), "specificity": float(np.mean(spec)),
                              "f1": float(np.mean(f1)), "accuracy": None, "confusion": None}
    if hist.shape[0] == 2:
        tp, fn = hist[1, 1, e + 1:].sum(), hist[1, 1, : e + 1].sum()
        fp, tn = hist[1, 0, e + 1:].sum(), hist[1, 0, : e + 1].sum()
        out["accuracy"] = _safe_div(tp + tn, tp + tn + fp + fn)
        out["confusion"] = [[int(tn), int(fp)], [int(fn), int(tp)]]
    return out


def summarise_histograms(hist: np.ndarray, *, threshold: float | None = None,
                         target_sensitivity: float | None = None) -> BinnedSummary:
    """All validation figures of one histogram. Without ``threshold`` one is chosen from these
    counts (:func:`choose_threshold`); per-site figures pass the pooled threshold instead."""
    hist = np.asarray(hist)
    if threshold is None:
        threshold = choose_threshold(hist, target_sensitivity=target_sensitivity)
    rates = at_threshold(hist, threshold)
    return BinnedSummary(
        auc=macro_auc_from_histograms(hist), loss=loss_from_histograms(hist), threshold=threshold,
        sensitivity=rates["sensitivity"], specificity=rates["specificity"],  # type: ignore[arg-type]
        accuracy=rates["accuracy"], f1=rates["f1"],  # type: ignore[arg-type]
        num_examples=num_examples_from_histograms(hist), confusion=rates["confusion"],  # type: ignore[arg-type]
    )


def pool_histograms(hists: list[np.ndarray]) -> np.ndarray:
    """Sum several sites' signed histograms (same shape) into the pooled one, unclipped: the figures
    computed from it clip at 0 after pooling (issue 10)."""
    return np.sum(np.stack([np.asarray(h, dtype=np.int64) for h in hists]), axis=0)


def pooled_summary(hists: list[np.ndarray], *, target_sensitivity: float | None = None) -> BinnedSummary:
    """Global validation figures from several sites' histograms: sum the counts, compute once,
    with the operating threshold chosen on the pooled counts."""
    return summarise_histograms(pool_histograms(hists), target_sensitivity=target_sensitivity)
