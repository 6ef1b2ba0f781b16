"""Metrics (common/metrics.py) and evaluation (common/evaluation.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedrad.common.datasets import ImageSplit
from fedrad.common.evaluation import evaluate
from fedrad.common.metrics import (
    HIST_BINS,
    auc_from_histogram,
    auc_from_scores,
    confusion_matrix,
    macro_auc_from_histograms,
    pooled_summary,
    score_histograms,
    summarise,
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
    assert hist[1, 0, HIST_BINS - 1] == 1 and hist[1, 1, 0] == 1
    assert macro_auc_from_histograms(hist) == 1.0


def _site(rng: np.random.Generator, n: int, shift: float, pos_rate: float):
    labels = (rng.random(n) < pos_rate).astype(np.int64)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + shift + 1.5 * labels)))
    return labels, _probs(scores)


def test_pooled_summary_equals_summary_of_concatenated_data() -> None:
    rng = np.random.default_rng(7)
    a, b = _site(rng, 300, -0.5, 0.3), _site(rng, 500, 0.8, 0.6)
    cms = [confusion_matrix(y, p.argmax(1), 2) for y, p in (a, b)]
    hists = [score_histograms(y, p) for y, p in (a, b)]
    y_all, p_all = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])

    pooled = pooled_summary(cms, hists)
    exact = summarise_scores(y_all, p_all)

    assert pooled.accuracy == exact.accuracy
    assert pooled.sensitivity == exact.sensitivity
    assert pooled.specificity == exact.specificity
    assert pooled.f1 == exact.f1
    assert pooled.auc == pytest.approx(exact.auc, abs=0.01)


def test_pooling_differs_from_averaging_site_aucs() -> None:
    # Site A: all scores low; site B: all scores high; within each site the classes are
    # perfectly separated. Pooled, the negatives of B outrank the positives of A.
    ya, pa = np.array([0, 0, 1, 1]), np.array([0.05, 0.10, 0.20, 0.25])
    yb, pb = np.array([0, 0, 1, 1]), np.array([0.70, 0.75, 0.90, 0.95])
    sites = [(ya, _probs(pa)), (yb, _probs(pb))]
    per_site = [summarise_scores(y, p).auc for y, p in sites]

    pooled = pooled_summary(
        [confusion_matrix(y, p.argmax(1), 2) for y, p in sites], [score_histograms(y, p) for y, p in sites]
    )

    assert per_site == [1.0, 1.0]
    exact_pooled = auc_from_scores(np.concatenate([ya, yb]), np.concatenate([pa, pb]))
    assert exact_pooled == 0.75
    assert pooled.auc == pytest.approx(0.75, abs=1e-12)
    assert pooled.auc != pytest.approx(np.mean(per_site))


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
    assert ev.histograms.shape == (2, 2, HIST_BINS) and ev.histograms.sum() == 2 * 37
    probs = torch.softmax(model(torch.from_numpy(split.images)), 1).detach().numpy()
    expected_loss = -np.mean(np.log(probs[np.arange(37), split.labels]))
    assert ev.loss == pytest.approx(expected_loss, rel=1e-5)
