"""Issue 9, points 2 and 3: nothing unprotected leaves a hospital, and evaluation is no longer an oracle.

Before: a train reply carried the exact ``train_loss`` (a crafted global model turned it into
the site's positive-label fraction) and the true training-set size; an evaluate reply carried
exact label counts, loss, AUC and score histograms with single patients in bins, unlimited and
unbudgeted, even after the training budget was spent. Now a train reply carries only the
weights, the DP-released size and mechanism/budget numbers; an evaluate reply carries only
DP-noised histograms, charged to the ledger's validation account before release and refused once
the study's evaluations are used up.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.privacy.releases import SIZE_NOISE_MULTIPLIER, gaussian_histograms
from fedrad.client.runtime import app as client_app
from fedrad.common.metrics import HIST_BINS
from fedrad.common.planning import sampling_plan
from fedrad.common.protocol import ERR_BUDGET, ERR_POLICY, EVAL_METRICS, TRAIN_METRICS
from tests.adversarial.test_node_kit import deployed_node, message, sim_context, sim_ledger, study

UNPROTECTED = {"train_loss", "train_seconds", "val_loss", "auc", "accuracy", "sensitivity", "specificity", "f1",
               "confusion"}


def test_train_reply_carries_no_loss_and_only_the_released_size(tmp_path: Path) -> None:
    s = study()
    sizes = []
    for rnd in (1, 2):
        reply = client_app.train(message(s, "train", tmp_path, server_round=rnd), sim_context())
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        assert not UNPROTECTED & set(metrics.keys())
        assert set(metrics.keys()) <= TRAIN_METRICS
        sizes.append(metrics["num-examples"])

    ledger = sim_ledger(tmp_path)
    assert sizes[0] == sizes[1] == ledger["released_size"]["value"]  # released once, re-sent unchanged
    size_entries = [e for e in ledger["entries"] if e["study"] == "<dataset-size>"]
    assert len(size_entries) == 1 and size_entries[0]["account"] == "train"  # charged once, to training
    assert (size_entries[0]["noise_multiplier"], size_entries[0]["sample_rate"], size_entries[0]["steps"]) == (
        SIZE_NOISE_MULTIPLIER, 1.0, 1)
    # the plan (and so every number sent) is computed from the released size, not the true one
    steps = [e["steps"] for e in ledger["entries"] if e["study"] != "<dataset-size>"]
    assert steps == [sampling_plan(num_examples=sizes[0], batch_size=16, local_epochs=1).steps] * 2


def test_evaluate_reply_is_noisy_histograms_only_and_charged_first(tmp_path: Path) -> None:
    s = study()
    replies = [client_app.evaluate_global(message(s, "evaluate", tmp_path, server_round=1), sim_context())
               for _ in range(2)]

    for r in replies:
        assert not r.has_error(), r.error.reason
        assert set(r.content.keys()) - {"receipt"} == {"metrics"}
        metrics = r.content["metrics"]
        assert set(metrics.keys()) <= EVAL_METRICS and not UNPROTECTED & set(metrics.keys())
        hist = np.asarray(metrics["histograms"])
        assert hist.shape == (2 * 2 * HIST_BINS,) and (hist >= 0).all()
        assert metrics["num-examples"] == int(hist.reshape(2, 2, -1)[0].sum())
    # the same model on the same data twice: the releases differ (fresh Gaussian noise each time)
    assert replies[0].content["metrics"]["histograms"] != replies[1].content["metrics"]["histograms"]
    assert [r.content["metrics"]["round"] for r in replies] == [1, 2]  # the node's own count
    ledger = sim_ledger(tmp_path)
    val = [e for e in ledger["entries"] if e["account"] == "val"]
    assert len(val) == 2 and all((e["sample_rate"], e["steps"]) == (1.0, 1) for e in val)
    assert replies[1].content["metrics"]["epsilon"] > replies[0].content["metrics"]["epsilon"] > 0
    assert [e for e in ledger["entries"] if e["account"] == "train"] == []  # the training account is untouched


def test_evaluations_are_refused_once_the_studys_allowance_is_spent(tmp_path: Path) -> None:
    s = study(federation={"rounds": 2})  # planned evaluations: rounds + 1 = 3
    for _ in range(3):
        ok = client_app.evaluate_global(message(s, "evaluate", tmp_path, server_round=1), sim_context())
        assert not ok.has_error(), ok.error.reason
    path = tmp_path / "hospital-1" / "privacy-ledger.json"
    before = path.read_bytes()

    refused = client_app.evaluate_global(message(s, "evaluate", tmp_path, server_round=1), sim_context())

    assert refused.has_error() and refused.error.code == ERR_BUDGET == 4001
    assert "all its 3 evaluations" in refused.error.reason
    assert path.read_bytes() == before
    ledger = sim_ledger(tmp_path)
    # the three releases together fit the study's epsilon on the validation account
    assert max(e["epsilon_after"] for e in ledger["entries"] if e["account"] == "val") <= 8.0 + 1e-9


def test_evaluate_obeys_the_node_policy_like_training(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  require_dp: true\n  min_hospitals: 1\n")
    s = study(privacy={"enabled": False}, simulation={"node_policy": str(policy)})

    reply = client_app.evaluate_global(message(s, "evaluate", tmp_path / "state"), sim_context())

    assert reply.has_error() and reply.error.code == ERR_POLICY and "rule require_dp" in reply.error.reason


def test_node_yaml_can_lower_the_evaluation_allowance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _node_yaml, ctx = deployed_node(tmp_path, monkeypatch, evaluation={"max_per_study": 1})
    s = study()

    first = client_app.evaluate_global(message(s, "evaluate", None), ctx)
    second = client_app.evaluate_global(message(s, "evaluate", None), ctx)

    assert not first.has_error(), first.error.reason
    assert second.has_error() and second.error.code == ERR_BUDGET


def test_histogram_noise_has_the_calibrated_scale() -> None:
    """The Gaussian mechanism over c slices: std = noise_multiplier * sqrt(c) per count (measured)."""
    sigma, c = 1.7, 3
    big = np.full((c, 2, 4000), 1000, dtype=np.int64)  # far from 0: no clipping

    noisy = gaussian_histograms(big, noise_multiplier=sigma)

    diff = (noisy - big).astype(np.float64)
    assert abs(diff.mean()) < 0.1
    assert diff.std() == pytest.approx(sigma * math.sqrt(c), rel=0.03)
    assert noisy.dtype == np.int64 and (gaussian_histograms(np.zeros((2, 2, 50)), noise_multiplier=3.0) >= 0).all()


def test_a_non_dp_study_the_policy_allows_gets_exact_histograms_and_is_still_counted(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  require_dp: false\n  min_hospitals: 1\n")
    s = study(privacy={"enabled": False}, simulation={"node_policy": str(policy)})
    state = tmp_path / "state"

    reply = client_app.evaluate_global(message(s, "evaluate", state), sim_context())

    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 32 and sum(metrics["histograms"]) == 2 * 32  # exact: one count per class slice
    assert "epsilon" not in metrics and metrics["round"] == 1
    ledger = sim_ledger(state)
    assert ledger["entries"] == [] and next(iter(ledger["studies"].values()))["evaluations"] == 1
