"""The pooled AUC's standard error and the model choice that weighs it (issue 10's leftover)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.privacy.releases import gaussian_histograms, histogram_noise_std
from fedrad.common.auc_noise import auc_standard_error, beats_beyond_noise, pooled_noise_std
from fedrad.common.metrics import macro_auc_from_histograms, pool_histograms, score_histograms
from fedrad.server.best_model import BEST_MODEL, Z_CHOICE, choose_final
from fedrad.server.checkpoints import load_checkpoint, save_checkpoint
from fedrad.server.history import StudyHistory


def _site_histogram(rng: np.random.Generator, n: int, *, separation: float = 1.5) -> np.ndarray:
    """Binary score histograms of ``n`` validation examples of a model with the given separation."""
    labels = rng.integers(0, 2, n)
    z = rng.normal(0.0, 1.0, n) + separation * (2 * labels - 1)
    p1 = 1 / (1 + np.exp(-z))
    return score_histograms(labels, np.stack([1 - p1, p1], axis=1))


def test_pooled_noise_std_is_the_root_sum_of_squares() -> None:
    assert pooled_noise_std([3.0, 4.0]) == pytest.approx(5.0)
    assert pooled_noise_std([0.0, 0.0]) == 0.0
    assert pooled_noise_std([None, None]) is None
    assert pooled_noise_std([None, 2.0]) == pytest.approx(2.0)


def test_node_states_the_noise_std_its_mechanism_adds() -> None:
    # arrange: the node's histogram mechanism at noise multiplier 2 on a binary histogram
    std = histogram_noise_std(noise_multiplier=2.0, num_classes=2)
    zeros = np.zeros((2, 2, 32), dtype=np.int64)
    # act: many cells of pure noise
    draws = np.concatenate([gaussian_histograms(zeros, noise_multiplier=2.0).ravel() for _ in range(40)])
    # assert: the stated std is the std of the counts it releases (rounding adds 1/12 variance)
    assert std == pytest.approx(2.0 * math.sqrt(2))
    assert np.std(draws) == pytest.approx(math.sqrt(std**2 + 1 / 12), rel=0.08)
    with pytest.raises(Exception, match="noise_multiplier"):
        histogram_noise_std(noise_multiplier=0.0, num_classes=2)


def test_without_noise_the_error_is_the_sampling_error() -> None:
    # arrange: 2000 validation examples of a good model
    rng = np.random.default_rng(0)
    hist = _site_histogram(rng, 2000)
    auc = macro_auc_from_histograms(hist)
    n1, n0 = hist[1, 1].sum(), hist[1, 0].sum()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    hanley_mcneil = math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    # act
    se = auc_standard_error(hist, noise_std=0.0)
    # assert: the bootstrap agrees with the analytic (Hanley & McNeil 1982) error
    assert se is not None and se == pytest.approx(hanley_mcneil, rel=0.3)


def test_the_error_predicts_the_spread_of_noisy_pooled_aucs() -> None:
    # arrange: 20 small sites; the same model validated again and again with fresh DP noise
    rng = np.random.default_rng(1)
    sites = [_site_histogram(rng, 30) for _ in range(20)]
    sigma = 2.7  # the validation noise multiplier of the 20-site study at epsilon 8
    std = histogram_noise_std(noise_multiplier=sigma, num_classes=2)
    # act: 60 independent noisy measurements of the pooled AUC, and the error each one estimates
    aucs, ses = [], []
    for _ in range(60):
        noisy = pool_histograms([gaussian_histograms(h, noise_multiplier=sigma) for h in sites])
        aucs.append(macro_auc_from_histograms(noisy))
        ses.append(auc_standard_error(noisy, noise_std=pooled_noise_std([std] * 20), replicates=100))
    # assert: the real spread is large (the noise dominates) and a single measurement's error
    # estimate is of its size (measured: 0.82x the spread here)
    spread = float(np.std(aucs, ddof=1))
    assert spread > 0.03
    assert 0.7 * spread < float(np.median(ses)) < 2.0 * spread
    assert float(np.median(ses)) > 3 * auc_standard_error(sites[0] * 20, noise_std=0.0)


def test_the_error_is_reproducible_and_undefined_without_both_classes() -> None:
    hist = _site_histogram(np.random.default_rng(2), 200)
    assert auc_standard_error(hist, noise_std=5.0) == auc_standard_error(hist, noise_std=5.0)
    one_class = hist.copy()
    one_class[1, 0] = 0  # no negatives
    assert auc_standard_error(one_class, noise_std=0.0) is None
    with pytest.raises(ValueError, match="noise_std"):
        auc_standard_error(hist, noise_std=-1.0)


def test_beats_beyond_noise() -> None:
    assert not beats_beyond_noise(0.715, 0.634, se_better=0.05, se_worse=0.05, z=2.0)
    assert beats_beyond_noise(0.90, 0.80, se_better=0.01, se_worse=0.01, z=2.0)
    assert beats_beyond_noise(0.81, 0.80, se_better=None, se_worse=0.01, z=2.0)  # unknown: plain comparison


def test_pool_validation_states_the_error_only_when_every_site_states_its_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hists = {"a": _site_histogram(rng, 100), "b": _site_histogram(rng, 100)}
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s")
    history.pool_validation(1, hists, noise_std={"a": 3.0, "b": 4.0})
    history.pool_validation(2, hists, noise_std={"a": 3.0})  # b did not say
    history.pool_validation(3, hists)
    assert history.rounds[1].pooled["noise_std"] == pytest.approx(5.0) and history.rounds[1].pooled["auc_se"] > 0
    assert history.rounds[2].pooled["auc_se"] is None and history.rounds[3].pooled["auc_se"] is None


def _history(tmp_path: Path, rounds: dict[int, tuple[float, float | None]]) -> StudyHistory:
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s")
    for n, (auc, se) in rounds.items():
        history.round(n).pooled = {"auc": auc, "loss": 0.5, "threshold": 0.5, "auc_se": se}
        history.round(n).site("hospital-1")["noise_multiplier"] = 1.0
    return history


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), v)}


def _keep_best(run_dir: Path, n: int) -> None:
    save_checkpoint(run_dir / BEST_MODEL, state_dict=_state(float(n)), study={}, round=n, class_names=["a", "b"])


def test_an_earlier_round_within_the_noise_does_not_replace_the_last_model(tmp_path: Path) -> None:
    # arrange: round 2 validated best, but by less than the noise explains (the 20-site study's figures)
    history = _history(tmp_path, {1: (0.51, 0.05), 2: (0.715, 0.05), 3: (0.634, 0.05)})
    _keep_best(tmp_path, 2)
    # act
    state, choice = choose_final(history, tmp_path, last_state=_state(3.0), last_round=3)
    # assert: the last model, the best kept apart and named, and why
    assert choice["is"] == "last" and choice["round"] == 3 and choice["best_round"] == 2
    assert torch.equal(state["w"], _state(3.0)["w"])
    assert choice["best_file"] == BEST_MODEL and load_checkpoint(tmp_path / BEST_MODEL)["round"] == 2
    assert "within the validation's noise" in choice["note"] and f"{Z_CHOICE:g} standard errors" in choice["note"]


def test_an_earlier_round_beyond_the_noise_is_chosen(tmp_path: Path) -> None:
    history = _history(tmp_path, {1: (0.80, 0.01), 2: (0.92, 0.01), 3: (0.85, 0.01)})
    _keep_best(tmp_path, 2)
    state, choice = choose_final(history, tmp_path, last_state=_state(3.0), last_round=3)
    assert choice["is"] == "best" and choice["round"] == 2
    assert torch.equal(state["w"], _state(2.0)["w"])


def test_a_last_round_trained_with_far_more_noise_falls_back_to_the_best(tmp_path: Path) -> None:
    # arrange: within the noise, but the last round's update carried 10x the noise (a resumed study)
    history = _history(tmp_path, {1: (0.80, 0.05), 2: (0.82, 0.05), 3: (0.78, 0.05)})
    history.round(3).site("hospital-1")["noise_multiplier"] = 10.0
    _keep_best(tmp_path, 2)
    _, choice = choose_final(history, tmp_path, last_state=_state(3.0), last_round=3)
    assert choice["is"] == "best" and choice["round"] == 2


def test_without_stated_errors_the_best_is_chosen_as_before(tmp_path: Path) -> None:
    history = _history(tmp_path, {1: (0.80, None), 2: (0.82, None), 3: (0.81, None)})
    _keep_best(tmp_path, 2)
    _, choice = choose_final(history, tmp_path, last_state=_state(3.0), last_round=3)
    assert choice["is"] == "best" and choice["round"] == 2


def test_an_overflowing_stated_noise_never_fails_the_pooling(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    hists = {"a": _site_histogram(rng, 100), "b": _site_histogram(rng, 100)}
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s")
    assert pooled_noise_std([1e200, 1.0]) is None
    history.pool_validation(1, hists, noise_std={"a": 1e200, "b": 1.0})
    assert history.rounds[1].pooled["auc_se"] is None and history.rounds[1].pooled["auc"] > 0.5


def test_screening_bounds_the_stated_noise() -> None:
    from fedrad.server.screening import EVAL_FIELDS, RejectedReply, _scalars

    assert _scalars({"histogram-noise-std": 12.5}, allowed=EVAL_FIELDS) == {"histogram-noise-std": 12.5}
    for bad in (-1.0, 1e200):
        with pytest.raises(RejectedReply, match="histogram-noise-std"):
            _scalars({"histogram-noise-std": bad}, allowed=EVAL_FIELDS)


def test_within_the_noise_a_best_model_file_of_another_round_is_redone_from_the_checkpoint(tmp_path: Path) -> None:
    # arrange: after a resume best-model.pt holds round 3, the best validated round is 2 (its checkpoint kept)
    history = _history(tmp_path, {1: (0.51, 0.05), 2: (0.715, 0.05), 3: (0.634, 0.05)})
    _keep_best(tmp_path, 3)
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(tmp_path / "checkpoints" / "round-0002.pt", state_dict=_state(2.0), study={}, round=2,
                    class_names=["a", "b"])
    # act
    _, choice = choose_final(history, tmp_path, last_state=_state(3.0), last_round=3)
    # assert: the last model is chosen and best-model.pt now holds round 2, as metrics.json says
    assert choice["is"] == "last" and choice["best_round"] == 2 and choice["best_file"] == BEST_MODEL
    assert load_checkpoint(tmp_path / BEST_MODEL)["round"] == 2
    assert torch.equal(load_checkpoint(tmp_path / BEST_MODEL)["state_dict"]["w"], _state(2.0)["w"])
