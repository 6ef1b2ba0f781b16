"""A round's record keeps what its train reply did apart from what the evaluation of its model did.

Seen in the deployment test where a hospital is killed mid-round and restarted (issue 14's
evaluate-first flow): the restarted hospital missed round 2, trained in round 3 (its last), then
its reply to the plain evaluate message of the final model came back as an error; that error
replaced the round's ``status`` "ok", so its records said it never trained after the restart. The
evaluation's outcome belongs in ``val_status`` (as a refused evaluation inside a train reply already
did); ``status`` stays the train reply's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedrad.common.config import parse_study
from fedrad.common.metrics import HIST_BINS
from fedrad.common.protocol import ERR_BUDGET, ERR_REFUSED
from fedrad.server.history import StudyHistory
from fedrad.server.progress import NullReporter
from fedrad.server.study import _Wiring, make_strategy

SHAPES = {"w": (2, 3), "b": (2,)}
NAMES = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}  # deployment: the coordinator's registry
#: Flower's SuperLink/SuperNode-made error codes (flwr.common.constant.ErrorCode)
NODE_UNAVAILABLE, CLIENT_APP_CRASHED = 5, 8


def _strategy(tmp_path: Path):  # type: ignore[no-untyped-def]
    study = parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 2, "rounds": 3}})
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="sid")
    wiring = _Wiring(history=history, reporter=NullReporter(), expected_shapes=dict(SHAPES), round_offset=0,
                     min_hospitals=2, names=dict(NAMES), num_classes=2, fold_evaluation=True, last_server_round=3)
    return make_strategy(study, wiring)


def _md(node: int, kind: str) -> Metadata:
    return Metadata(run_id=1, message_id=f"r{node}-{time.time_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="q", group_id="3", created_at=time.time(), ttl=DEFAULT_TTL,
                    message_type=kind)


def _trained(node: int) -> Message:
    arrays = ArrayRecord({"w": torch.ones(2, 3), "b": torch.ones(2)})
    metrics = MetricRecord({"num-examples": 10, "round": 1, "steps": 6, "epsilon": 1.0})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), metadata=_md(node, MessageType.TRAIN))


def _evaluated(node: int, **extra: object) -> Message:
    metrics = MetricRecord({"num-examples": 4, "round": 2, "histograms": [1] * (2 * 2 * HIST_BINS), **extra})
    return Message(content=RecordDict({"metrics": metrics}), metadata=_md(node, MessageType.EVALUATE))


def _error(node: int, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=reason), metadata=_md(node, MessageType.EVALUATE))


def test_a_failed_final_evaluation_does_not_unmake_the_round_a_hospital_trained(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    strat.aggregate_train(3, [_trained(11), _trained(12), _trained(13)])

    strat.aggregate_evaluate(3, [_evaluated(11), _evaluated(12),
                                 _error(13, CLIENT_APP_CRASHED, "ClientApp stopped responding.")])

    rec = strat._fedrad.history.round(3)
    c = rec.hospitals["hospital-c"]
    assert c["status"] == "ok" and c["steps"] == 6 and c["num_examples"] == 10  # it trained in round 3
    assert c["val_status"] == "failed: ClientApp stopped responding."
    assert rec.pooled["sites"] == 2  # its evaluation is simply missing from the pooled validation
    assert any("hospital-c" in e and "stopped responding" in e for e in strat._fedrad.history.events)
    assert all("val_status" not in rec.hospitals[n] for n in ("hospital-a", "hospital-b"))


def test_a_refused_or_rejected_final_evaluation_is_the_evaluation_s_status(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    strat.aggregate_train(3, [_trained(11), _trained(12), _trained(13)])

    strat.aggregate_evaluate(3, [_evaluated(11, patient_id=7), _error(12, ERR_BUDGET, "BudgetExceededError: spent"),
                                 _error(13, NODE_UNAVAILABLE, "Error: Node Unavailable")])

    hospitals = strat._fedrad.history.round(3).hospitals
    assert all(h["status"] == "ok" and h["steps"] == 6 for h in hospitals.values())
    assert hospitals["hospital-a"]["val_status"].startswith("rejected (evaluate): ") and "patient_id" in hospitals["hospital-a"]["val_status"]
    assert hospitals["hospital-b"]["val_status"] == "refused: BudgetExceededError: spent"
    assert hospitals["hospital-c"]["val_status"] == "failed: Error: Node Unavailable"


def test_a_train_failure_is_still_the_round_s_status(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)

    strat.aggregate_train(3, [_trained(11), _trained(12),
                              Message(error=Error(code=ERR_REFUSED, reason="RuntimeError: the node failed"),
                                      metadata=_md(13, MessageType.TRAIN))])

    c = strat._fedrad.history.round(3).hospitals["hospital-c"]
    assert c["status"] == "failed: RuntimeError: the node failed" and "steps" not in c


def test_without_a_train_reply_in_the_round_the_evaluation_s_outcome_is_the_row_s_status(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    strat.aggregate_train(3, [_trained(11), _trained(12)])  # hospital-c was not asked to train in round 3

    strat.aggregate_evaluate(3, [_evaluated(11), _evaluated(12), _error(13, CLIENT_APP_CRASHED, "stopped")])

    c = strat._fedrad.history.round(3).hospitals["hospital-c"]
    assert c["status"] == c["val_status"] == "failed: stopped" and "steps" not in c
