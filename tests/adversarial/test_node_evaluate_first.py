"""Issue 14: a train message may ask the node to evaluate the incoming global model first.

The node spends that evaluation exactly like a plain evaluate message (its own count and
allowance, the validation account, OS-entropy noise, audited), whatever the coordinator asks:
"evaluate first" on every message, or never. The evaluation counts of a study do not grow: the new
flow (evaluations inside rounds 2..R, one plain evaluation of the final model) spends the same
evaluations at the same noise as the old one (a plain evaluation after every round).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedrad.client.runtime import app as client_app
from fedrad.client.runtime.site import simulated_site
from fedrad.common.errors import ProtocolError
from fedrad.common.evaluation import evaluate
from fedrad.common.metrics import HIST_BINS
from fedrad.common.protocol import (
    ERR_BUDGET,
    EVALUATE_FIRST_KEY,
    TRAIN_METRICS,
    check_reply,
)
from tests.adversarial.test_node_kit import global_arrays, message, sim_context, sim_ledger, study


def _train(s: Any, state: Path, *, server_round: int, evaluate_first: bool, arrays: Any = None) -> Any:
    msg = message(s, "train", state, server_round=server_round, arrays=arrays)
    if evaluate_first:
        msg.content["config"] = ConfigRecord({**dict(msg.content["config"]), EVALUATE_FIRST_KEY: True})
    return client_app.train(msg, sim_context())


def _audit_kinds(state: Path) -> list[tuple[str, str]]:
    lines = (state / "hospital-1" / "audit.jsonl").read_text().splitlines()
    return [(json.loads(x)["kind"], json.loads(x)["outcome"]) for x in lines if x.strip()]


def test_the_train_reply_carries_the_evaluation_of_the_model_it_received(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  require_dp: false\n  min_hospitals: 1\n")
    s = study(privacy={"enabled": False}, simulation={"node_policy": str(policy)})  # exact counts to compare
    state = tmp_path / "state"
    arrays = global_arrays(s, seed=5)

    reply = _train(s, state, server_round=2, evaluate_first=True, arrays=arrays)

    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) <= TRAIN_METRICS
    site = simulated_site(s, partition_id=0, num_partitions=3, state_dir=state)
    model = client_app.build_model(s.model.name, in_channels=site.data.channels, num_classes=2,
                                   image_size=site.data.image_size, options=s.model.options)
    model.load_state_dict(arrays.to_torch_state_dict())
    expected = evaluate(model, site.data.val, device=torch.device("cpu")).histograms
    assert metrics["val-histograms"] == [int(v) for v in np.asarray(expected).reshape(-1)]  # the incoming model
    assert metrics["val-round"] == 1 and metrics["round"] == 1  # the node's own counts
    assert metrics["val-num-examples"] == 32
    record = next(iter(sim_ledger(state)["studies"].values()))
    assert (record["train_rounds"], record["evaluations"]) == (1, 1)


def test_the_evaluation_is_charged_to_the_validation_account_and_audited_first(tmp_path: Path) -> None:
    s = study()
    state = tmp_path / "state"

    first = _train(s, state, server_round=1, evaluate_first=False)
    second = _train(s, state, server_round=2, evaluate_first=True)

    assert not first.has_error() and not second.has_error(), second.error.reason if second.has_error() else ""
    assert not any(k.startswith("val-") for k in first.content["metrics"].keys())
    m = second.content["metrics"]
    hist = np.asarray(m["val-histograms"])
    assert hist.shape == (2 * 2 * HIST_BINS,) and m["val-round"] == 1 and m["val-epsilon"] > 0
    assert m["val-num-examples"] == max(0, int(hist.reshape(2, 2, -1)[0].sum()))
    check_reply(second.content, kind="train", expected_shapes={k: tuple(v.numpy().shape) for k, v in
                                                               second.content["arrays"].items()}, num_classes=2)
    ledger = sim_ledger(state)
    val = [e for e in ledger["entries"] if e["account"] == "val"]
    assert len(val) == 1 and (val[0]["sample_rate"], val[0]["steps"]) == (1.0, 1)
    kinds = _audit_kinds(state)
    assert kinds[-2:] == [("evaluate", "sent (in the train reply)"), ("train", "sent")]
    assert second.content["receipt"]["audit-count"] == len(kinds)


def test_a_coordinator_asking_on_every_message_gets_no_more_than_the_allowance(tmp_path: Path) -> None:
    s = study(federation={"rounds": 2})  # allowance: rounds + 1 = 3 evaluations
    state = tmp_path / "state"

    plain = [client_app.evaluate_global(message(s, "evaluate", state, server_round=1), sim_context())
             for _ in range(2)]
    trained = _train(s, state, server_round=1, evaluate_first=True)   # the third evaluation
    refused = _train(s, state, server_round=2, evaluate_first=True)   # the allowance is spent: trains anyway

    assert not any(r.has_error() for r in plain)
    assert not trained.has_error() and trained.content["metrics"]["val-round"] == 3
    assert not refused.has_error(), refused.error.reason
    m = refused.content["metrics"]
    assert m["val-refused"] == ERR_BUDGET and not {k for k in m.keys() if k.startswith("val-")} - {"val-refused"}
    assert m["round"] == 2  # the training went on
    ledger = sim_ledger(state)
    assert len([e for e in ledger["entries"] if e["account"] == "val"]) == 3
    assert any(k == "evaluate" and o.startswith("refused: study") for k, o in _audit_kinds(state))


def _val_noise(ledger: dict[str, Any]) -> list[float]:
    return [e["noise_multiplier"] for e in ledger["entries"] if e["account"] == "val"]


@pytest.mark.parametrize("rounds", [2, 3])
def test_the_new_flow_spends_the_same_evaluations_at_the_same_noise(tmp_path: Path, rounds: int) -> None:
    s = study(federation={"rounds": rounds})
    old, new = tmp_path / "old", tmp_path / "new"

    for r in range(1, rounds + 1):  # before issue 14: a plain evaluation after every round
        assert not _train(s, old, server_round=r, evaluate_first=False).has_error()
        assert not client_app.evaluate_global(message(s, "evaluate", old, server_round=r), sim_context()).has_error()
    for r in range(1, rounds + 1):  # now: inside rounds 2..R, then one plain evaluation of the final model
        reply = _train(s, new, server_round=r, evaluate_first=r > 1)
        assert not reply.has_error() and "val-refused" not in reply.content["metrics"]
    assert not client_app.evaluate_global(message(s, "evaluate", new, server_round=rounds), sim_context()).has_error()

    old_noise, new_noise = _val_noise(sim_ledger(old)), _val_noise(sim_ledger(new))
    assert len(old_noise) == len(new_noise) == rounds
    assert new_noise == pytest.approx(old_noise, rel=1e-9)
    assert new_noise[-1] < new_noise[0]  # the final evaluation keeps its larger share (less noise)


def test_secure_aggregation_train_requests_never_evaluate(tmp_path: Path) -> None:
    s = study()
    msg = message(s, "train", tmp_path / "state", server_round=2)
    msg.content["config"] = ConfigRecord({**dict(msg.content["config"]), EVALUATE_FIRST_KEY: True})

    reply = client_app.train_reply(msg, sim_context(), secure_aggregation=True)

    assert not reply.has_error(), reply.error.reason
    assert not any(k.startswith("val-") for k in reply.content["metrics"].keys())
    assert [e for e in sim_ledger(tmp_path / "state")["entries"] if e["account"] == "val"] == []


def test_float16_delta_updates_are_the_difference_from_the_model_received(tmp_path: Path) -> None:
    s = study(federation={"update_encoding": "float16-delta"})
    arrays = global_arrays(s, seed=2)

    reply = _train(s, tmp_path / "state", server_round=1, evaluate_first=False, arrays=arrays)

    assert not reply.has_error(), reply.error.reason
    sent = reply.content["arrays"]
    shapes = {k: tuple(v.numpy().shape) for k, v in sent.items()}
    assert {str(v.numpy().dtype) for v in sent.values()} == {"float16"}
    check_reply(reply.content, kind="train", expected_shapes=shapes, update_encoding="float16-delta")
    with pytest.raises(ProtocolError, match="float32"):
        check_reply(reply.content, kind="train", expected_shapes=shapes)  # a float32 study refuses float16
    delta = np.concatenate([np.asarray(sent[k].numpy(), dtype=np.float64).ravel() for k in sorted(sent)])
    assert np.isfinite(delta).all() and np.abs(delta).max() > 0  # it trained
    assert np.abs(delta).max() < 10.0  # a difference, not the weights
