"""Metrics (common/metrics.py) and evaluation (common/evaluation.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedrad.common.datasets import ImageSplit
from fedrad.common.evaluation import evaluate
from fedrad.common.metrics import (
    BIN_EDGES,
    HIST_BINS,
    LOGIT_LIMIT,
    THRESHOLDS,
    at_threshold,
    auc_from_histogram,
    auc_from_scores,
    bin_index,
    choose_threshold,
    confusion_matrix,
    loss_from_histograms,
    macro_auc_from_histograms,
    pooled_summary,
    score_histograms,
    summarise,
    summarise_histograms,
    summarise_scores,
)


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels.astype(bool)], scores[~labels.astype(bool)]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def _probs(scores: np.ndarray) -> np.ndarray:
    return np.stack([1 - scores, scores], 1)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_pairwise_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties

    assert auc_from_scores(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc_from_scores(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc_from_scores(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc_from_scores(y, np.full(4, 0.5)) == 0.5
    assert auc_from_scores(y, np.array([0.1, 0.9, 0.1, 0.9])) == 0.5
    assert np.isnan(auc_from_scores(np.zeros(5), np.linspace(0, 1, 5)))
    assert np.isnan(auc_from_scores(np.ones(5), np.linspace(0, 1, 5)))
    assert np.isnan(auc_from_histogram(np.zeros(HIST_BINS), np.ones(HIST_BINS)))


@pytest.mark.parametrize("seed", range(3))
def test_histogram_auc_close_to_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 2000)
    scores = 1 / (1 + np.exp(-(rng.normal(size=2000) + 1.2 * labels)))

    hist = score_histograms(labels, _probs(scores))
    approx = macro_auc_from_histograms(hist)

    assert hist.shape == (2, 2, HIST_BINS)
    assert hist.sum() == 2 * 2000
    assert approx == pytest.approx(auc_from_scores(labels, scores), abs=0.01)


def test_histogram_handles_probability_one() -> None:
    hist = score_histograms(np.array([1, 0]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    # layout hist[k, t, b]: t = 1 where the true label is k
    assert hist[1, 1, HIST_BINS - 1] == 1 and hist[1, 0, 0] == 1
    assert hist[0, 1, HIST_BINS - 1] == 1 and hist[0, 0, 0] == 1
    assert macro_auc_from_histograms(hist) == 1.0


def _site(rng: np.random.Generator, n: int, shift: float, pos_rate: float):
    labels = (rng.random(n) < pos_rate).astype(np.int64)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + shift + 1.5 * labels)))
    return labels, _probs(scores)


def test_pooled_summary_equals_summary_of_concatenated_data() -> None:
    rng = np.random.default_rng(7)
    a, b = _site(rng, 300, -0.5, 0.3), _site(rng, 500, 0.8, 0.6)
    hists = [score_histograms(y, p) for y, p in (a, b)]
    y_all, p_all = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    pooled = pooled_summary(hists)
    concatenated = summarise_histograms(score_histograms(y_all, p_all))
    exact = summarise_scores(y_all, p_all, threshold=pooled.threshold)

    assert pooled == concatenated  # summing counts == binning the pooled data
    assert pooled.num_examples == 800
    # at the chosen threshold the binned rates are exact (thresholds sit on bin edges)
    assert pooled.sensitivity == pytest.approx(exact.sensitivity, abs=1e-12)
    assert pooled.specificity == pytest.approx(exact.specificity, abs=1e-12)
    assert pooled.accuracy == pytest.approx(exact.accuracy, abs=1e-12)
    assert pooled.f1 == pytest.approx(exact.f1, abs=1e-12)
    assert pooled.auc == pytest.approx(exact.auc, abs=0.01)


def test_pooling_differs_from_averaging_site_aucs() -> None:
    # Site A: all scores low; site B: all scores high; within each site the classes are
    # perfectly separated. Pooled, the negatives of B outrank the positives of A.
    ya, pa = np.array([0, 0, 1, 1]), np.array([0.05, 0.10, 0.20, 0.25])
    yb, pb = np.array([0, 0, 1, 1]), np.array([0.70, 0.75, 0.90, 0.95])
    sites = [(ya, _probs(pa)), (yb, _probs(pb))]
    per_site = [summarise_scores(y, p).auc for y, p in sites]

    pooled = pooled_summary([score_histograms(y, p) for y, p in sites])

    assert per_site == [1.0, 1.0]
    exact_pooled = auc_from_scores(np.concatenate([ya, yb]), np.concatenate([pa, pb]))
    assert exact_pooled == 0.75
    assert pooled.auc == pytest.approx(0.75, abs=1e-12)
    assert pooled.auc != pytest.approx(np.mean(per_site))


# ------------------------------------------------------------------ logit bins (issue 10)
def test_bins_are_logit_spaced_with_open_ends() -> None:
    assert len(BIN_EDGES) == HIST_BINS - 1 and 24 <= HIST_BINS <= 40
    assert np.all(np.diff(BIN_EDGES) > 0) and BIN_EDGES[0] == -LOGIT_LIMIT and BIN_EDGES[-1] == LOGIT_LIMIT
    assert np.allclose(BIN_EDGES, -BIN_EDGES[::-1])  # symmetric: p and 1 - p mirror
    widths = np.diff(BIN_EDGES)
    assert widths.min() < 0.35 and widths.max() < 1.5  # fine near p = 0.5, never coarse in the tails
    p = np.array([0.0, 1e-30, 0.5, 0.999, 0.9999, 0.99999, 1.0])
    b = bin_index(p)
    assert b[0] == b[1] == 0 and b[-1] == b[-2] == HIST_BINS - 1  # open end bins take the extremes
    assert len({int(b[3]), int(b[4]), int(b[5])}) == 3  # saturated scores resolve
    assert np.all(np.diff(bin_index(np.linspace(0, 1, 1001))) >= 0)  # monotone


@pytest.mark.parametrize("seed", range(3))
def test_pooled_auc_of_saturated_separable_predictions_is_near_one(seed: int) -> None:
    # A confident model: every positive scores in [0.9999, 0.999999], every negative in
    # [0.99, 0.999]; equal-width probability bins would put all of them into one bin (AUC 0.5).
    rng = np.random.default_rng(seed)
    sites = []
    for n in (150, 300, 90):
        y = (rng.random(n) < 0.3).astype(np.int64)
        y[:2] = [0, 1]
        z = np.where(y == 1, rng.uniform(9.22, 13.8, n), rng.uniform(4.6, 6.9, n))
        sites.append((y, _probs(1 / (1 + np.exp(-z)))))
    exact = auc_from_scores(np.concatenate([y for y, _ in sites]), np.concatenate([p[:, 1] for _, p in sites]))

    pooled = pooled_summary([score_histograms(y, p) for y, p in sites])

    assert exact == 1.0
    assert pooled.auc > 0.99
    assert pooled.sensitivity > 0.95 and pooled.specificity > 0.95


def test_youden_threshold_from_counts() -> None:
    # Class-1 score histograms built directly from counts: 50 negatives in bins 10..14, 50
    # positives in bins 13..17. "Positive above bin e": e = 12: sens 1, spec 30/50 (J 0.6);
    # e = 13: 48/50, 40/50 (0.76); e = 14: 45/50, 1 (0.9); e = 15: 35/50, 1 (0.7).
    hist = np.zeros((2, 2, HIST_BINS), dtype=np.int64)
    hist[1, 0, 10:15] = 10  # 50 negatives, 10 per bin
    hist[1, 1, 13:18] = [2, 3, 10, 10, 25]  # 50 positives
    hist[0] = hist[1, ::-1, ::-1]  # the mirrored class-0 view of the same examples

    t = choose_threshold(hist)

    j = {e: (hist[1, 1, e + 1:].sum() / 50) + (hist[1, 0, : e + 1].sum() / 50) - 1 for e in range(len(BIN_EDGES))}
    best = max(j.values())
    assert best == pytest.approx(0.9) and [e for e, v in j.items() if v == best] == [14]
    assert t == pytest.approx(THRESHOLDS[14])  # the edge between bins 14 and 15
    rates = at_threshold(hist, t)
    assert rates["sensitivity"] == pytest.approx(45 / 50) and rates["specificity"] == 1.0
    assert rates["confusion"] == [[50, 0], [5, 45]]
    assert rates["accuracy"] == pytest.approx(95 / 100)
    # a target sensitivity picks the highest threshold that still reaches it
    assert choose_threshold(hist, target_sensitivity=1.0) == pytest.approx(THRESHOLDS[12])
    assert choose_threshold(hist, target_sensitivity=0.7) == pytest.approx(THRESHOLDS[15])


def test_threshold_needs_both_classes() -> None:
    hist = np.zeros((2, 2, HIST_BINS), dtype=np.int64)
    hist[1, 0, 5] = 10
    hist[0, 1, HIST_BINS - 6] = 10

    s = summarise_histograms(hist)

    assert s.threshold is None and np.isnan(s.auc) and np.isnan(s.sensitivity) and s.accuracy is None


@pytest.mark.parametrize("seed", range(3))
def test_loss_from_histograms_close_to_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5000
    labels = rng.integers(0, 2, n)
    z = rng.normal(size=n) * 2.0 + 1.5 * (2 * labels - 1)
    probs = _probs(1 / (1 + np.exp(-z)))
    exact = float(-np.mean(np.log(probs[np.arange(n), labels])))

    approx = loss_from_histograms(score_histograms(labels, probs))

    assert approx == pytest.approx(exact, rel=0.03)


def test_multiclass_loss_and_accuracy_not_invented() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3)) + 2.0 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    s = summarise_histograms(score_histograms(labels, probs))

    exact_loss = float(-np.mean(np.log(probs[np.arange(3000), labels])))
    assert s.loss == pytest.approx(exact_loss, rel=0.03)  # the categorical cross-entropy
    assert s.accuracy is None and s.confusion is None  # needs the argmax: not derivable from histograms
    assert 0 < s.sensitivity < 1 and 0 < s.specificity < 1 and s.threshold is not None


def test_noisy_histograms_are_post_processed_safely() -> None:
    # DP-released histograms are rounded and clipped at 0 on the node: any non-negative counts work.
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 2000)
    probs = _probs(1 / (1 + np.exp(-(rng.normal(size=2000) + 2 * labels - 1))))
    clean = score_histograms(labels, probs)
    noisy = np.clip(np.round(clean + rng.normal(0, 2.0, clean.shape)), 0, None).astype(np.int64)

    s, c = summarise_histograms(noisy), summarise_histograms(clean)

    assert abs(s.auc - c.auc) < 0.05 and abs(s.loss - c.loss) < 0.1
    assert s.threshold is not None and 0 <= s.sensitivity <= 1


def test_binary_summary_from_confusion() -> None:
    # rows = truth, cols = prediction; class 1 positive: TN=50 FP=10 FN=5 TP=35
    cm = np.array([[50, 10], [5, 35]])

    s = summarise(cm, auc=0.9)

    assert s.accuracy == pytest.approx(0.85)
    assert s.sensitivity == pytest.approx(35 / 40)
    assert s.specificity == pytest.approx(50 / 60)
    assert s.f1 == pytest.approx(70 / 85)
    assert s.as_dict()["auc"] == 0.9


def test_multiclass_confusion_and_macro_metrics() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1])

    cm = confusion_matrix(labels, preds, 3)
    s = summarise(cm, auc=float("nan"))

    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    assert s.accuracy == pytest.approx(6 / 9)
    sens = [2 / 3, 2 / 2, 2 / 4]
    spec = [5 / 6, 5 / 7, 5 / 5]
    f1 = [4 / 6, 4 / 6, 4 / 6]
    assert s.sensitivity == pytest.approx(np.mean(sens))
    assert s.specificity == pytest.approx(np.mean(spec))
    assert s.f1 == pytest.approx(np.mean(f1))


def test_multiclass_macro_auc_from_scores_and_histograms() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 900)
    logits = rng.normal(size=(900, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    exact = summarise_scores(labels, probs).auc
    hist_auc = macro_auc_from_histograms(score_histograms(labels, probs))

    one_vs_rest = np.mean([auc_from_scores(labels == k, probs[:, k]) for k in range(3)])
    assert exact == pytest.approx(one_vs_rest)
    assert hist_auc == pytest.approx(exact, abs=0.01)


def test_empty_class_gives_nan_not_crash() -> None:
    s = summarise(np.array([[5, 0], [0, 0]]), auc=float("nan"))
    assert s.accuracy == 1.0
    assert np.isnan(s.sensitivity)
    assert s.specificity == 1.0


def test_evaluate_returns_counts_only() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    rng = np.random.default_rng(0)
    split = ImageSplit(images=rng.random((37, 1, 4, 4)).astype(np.float32), labels=rng.integers(0, 2, 37))

    ev = evaluate(model, split, device=torch.device("cpu"), batch_size=8)

    assert ev.num_examples == 37
    assert ev.confusion.shape == (2, 2) and ev.confusion.sum() == 37
    assert ev.histograms.shape == (2, 2, HIST_BINS) and ev.histograms.dtype == np.int64
    assert ev.histograms.sum() == 2 * 37 and ev.histograms[0].sum() == 37
    probs = torch.softmax(model(torch.from_numpy(split.images)), 1).detach().numpy()
    expected_loss = -np.mean(np.log(probs[np.arange(37), split.labels]))
    assert ev.loss == pytest.approx(expected_loss, rel=1e-5)
    assert ev.threshold is None


def test_evaluate_at_a_threshold_is_exact_on_the_test_split() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    rng = np.random.default_rng(1)
    split = ImageSplit(images=rng.random((64, 1, 4, 4)).astype(np.float32), labels=rng.integers(0, 2, 64))
    p1 = torch.softmax(model(torch.from_numpy(split.images)).double(), 1)[:, 1].detach().numpy()
    t = float(np.median(p1))

    ev = evaluate(model, split, device=torch.device("cpu"), threshold=t)

    pred = p1 >= t
    y = split.labels.astype(bool)
    assert ev.threshold == t
    assert ev.summary.sensitivity == pytest.approx((pred & y).sum() / y.sum())
    assert ev.summary.specificity == pytest.approx((~pred & ~y).sum() / (~y).sum())
    assert ev.test_metrics()["threshold"] == t and ev.test_metrics()["num_examples"] == 64
