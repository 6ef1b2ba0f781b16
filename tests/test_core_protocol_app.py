"""Wire protocol filter (common/protocol.py) and the real ClientApp handlers (client/runtime/app.py), no Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedrad.client.runtime import app as client_app
from fedrad.client.runtime.site import simulated_site
from fedrad.common.config import StudyConfig, parse_study
from fedrad.common.errors import ProtocolError
from fedrad.common.models import build_model
from fedrad.common.planning import sampling_plan
from fedrad.common.protocol import ERR_BUDGET, ERR_PROTOCOL, EVAL_METRICS, MAX_LIST_LEN, TRAIN_METRICS, check_reply


# ------------------------------------------------------------------ check_reply
def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, 4), "b": torch.zeros(3)}


SHAPES = {"w": (3, 4), "b": (3,)}


def _train_reply(**metrics) -> RecordDict:
    m = {"num-examples": 10, "round": 1, "epsilon": 1.0, **metrics}
    return RecordDict({"arrays": ArrayRecord(_state()), "metrics": MetricRecord(m)})


def _eval_reply(**metrics) -> RecordDict:
    m = {"num-examples": 10, "round": 1, "epsilon": 0.5, **metrics}
    return RecordDict({"metrics": MetricRecord(m)})


RECEIPT = ConfigRecord({"audit-head": "ab" * 32, "audit-count": 3})


def test_check_reply_accepts_well_formed_replies() -> None:
    check_reply(_train_reply(), kind="train", expected_shapes=SHAPES)
    check_reply(_eval_reply(histograms=[1] * 400), kind="evaluate")
    check_reply(RecordDict({**_train_reply(), "receipt": RECEIPT}), kind="train", expected_shapes=SHAPES)
    check_reply(RecordDict({**_eval_reply(), "receipt": RECEIPT}), kind="evaluate")


@pytest.mark.parametrize(
    ("receipt", "match"),
    [
        (ConfigRecord({"audit-head": "AB" * 32, "audit-count": 3}), "lowercase hex"),
        (ConfigRecord({"audit-head": "ab" * 31, "audit-count": 3}), "lowercase hex"),
        (ConfigRecord({"audit-head": "ab" * 32, "audit-count": 0}), "audit-count"),
        (ConfigRecord({"audit-head": "ab" * 32, "audit-count": 1, "note": "x"}), "exactly"),
        (MetricRecord({"audit-count": 1}), "must be a ConfigRecord"),
    ],
)
def test_receipt_is_checked_exactly(receipt, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_reply(RecordDict({**_eval_reply(), "receipt": receipt}), kind="evaluate")


@pytest.mark.parametrize(
    ("content", "kind", "match"),
    [
        (_train_reply(epsilon=float("nan")), "train", "not finite"),
        (_train_reply(**{"num-examples": 0}), "train", "num-examples"),
        (_train_reply(round=0), "train", "round"),
        (_train_reply(steps=2.5), "train", "must be an int"),
        (_eval_reply(epsilon=float("inf")), "evaluate", "not finite"),
    ],
)
def test_check_reply_refuses_garbage_numbers(content: RecordDict, kind: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_reply(content, kind=kind, expected_shapes=SHAPES if kind == "train" else None)


@pytest.mark.parametrize("key", ["train_loss", "train_seconds", "val_loss", "auc", "accuracy", "confusion"])
def test_unprotected_statistics_are_off_the_allow_lists(key: str) -> None:
    assert key not in TRAIN_METRICS and key not in EVAL_METRICS


def test_train_reply_is_never_waved_through_without_the_models_shapes() -> None:
    with pytest.raises(ProtocolError, match="expected array names and shapes are required"):
        check_reply(_train_reply(), kind="train")


@pytest.mark.parametrize(
    ("content", "kind", "match"),
    [
        (RecordDict({**_train_reply(), "extra": MetricRecord({"x": 1})}), "train", "must hold records"),
        (RecordDict({**_eval_reply(), "arrays": ArrayRecord(_state())}), "evaluate", "must hold records"),
        (RecordDict({"metrics": MetricRecord({"num-examples": 1})}), "train", "must hold records"),
        (RecordDict({**_train_reply(), "config": ConfigRecord({"note": "hello"})}), "train", "must hold records"),
        (RecordDict({**_train_reply(), "receipt": ConfigRecord({"note": "hello"})}), "train", "exactly"),
        (RecordDict({"arrays": ArrayRecord(_state()), "metrics": ConfigRecord({"num-examples": 1, "who": "x"})}),
         "train", "must be a MetricRecord"),
        (RecordDict({"arrays": ConfigRecord({"a": 1}), "metrics": MetricRecord({"num-examples": 1})}),
         "train", "must be an ArrayRecord"),
        (_train_reply(patient_id=1234), "train", "patient_id"),
        (_eval_reply(train_loss=0.1), "evaluate", "train_loss"),
        (_eval_reply(auc=0.9), "evaluate", "auc"),
        (RecordDict({"metrics": MetricRecord({"round": 1})}), "evaluate", "num-examples"),
        (_eval_reply(histograms=[0] * (MAX_LIST_LEN + 1)), "evaluate", "histograms"),
        (_train_reply(), "query", "unknown message kind"),
    ],
)
def test_check_reply_rejects(content: RecordDict, kind: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_reply(content, kind=kind, expected_shapes=SHAPES if kind == "train" else None)


def test_check_reply_rejects_wrong_array_names_and_shapes() -> None:
    with pytest.raises(ProtocolError, match="array names differ"):
        check_reply(_train_reply(), kind="train", expected_shapes={"w": (3, 4), "b": (3,), "c": (1,)})
    wrong = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3, 4), "b": torch.zeros(64)}),
                        "metrics": MetricRecord({"num-examples": 1})})
    with pytest.raises(ProtocolError, match=r"wrong shapes: \['b'\]"):
        check_reply(wrong, kind="train", expected_shapes=SHAPES)


def test_allow_lists_hold_no_identifying_keys() -> None:
    for key in TRAIN_METRICS | EVAL_METRICS:
        assert not any(w in key for w in ("patient", "name", "id_", "path", "uid"))


# ------------------------------------------------------------------ the real ClientApp
STUDY = {
    "federation": {"num_hospitals": 3, "rounds": 2, "seed": 3},
    "model": {"name": "cnn", "options": {"widths": [8, 16], "dense": 16}},
    "data": {"max_train_per_hospital": 64, "max_val_per_hospital": 32, "class_names": ["normal", "pneumonia"],
             "partition": {"scheme": "iid", "min_per_hospital": 16}},
    "privacy": {"enabled": True, "epsilon": 8.0},
    "training": {"batch_size": 16, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1,
                 "class_weighting": "none"},
}
N_TRAIN, N_VAL, SIZE = 64, 32, 28


def _study(**privacy) -> StudyConfig:
    d = json.loads(json.dumps(STUDY))
    d["privacy"].update(privacy)
    return parse_study(d)


def _global_arrays(study: StudyConfig) -> ArrayRecord:
    torch.manual_seed(0)
    m = build_model(study.model.name, in_channels=1, num_classes=2, image_size=SIZE, options=study.model.options)
    return ArrayRecord(m.state_dict())


def _message(study: StudyConfig, kind: str, state_dir: Path, *, server_round: int = 1, total: int = 2,
             node_id: int = 1001, arrays: ArrayRecord | None = None, config: dict | None = None) -> Message:
    cfg = {"study": study.to_json(), "server-round": server_round, "total-rounds": total, "study-id": "unit-study",
           "round-offset": 0, "sim-state-dir": str(state_dir)}
    if config is not None:
        cfg = config
    content = RecordDict({"arrays": arrays if arrays is not None else _global_arrays(study), "config": ConfigRecord(cfg)})
    # As Flower delivers an instruction to a ClientApp: SuperLink-assigned id, the coordinator as source.
    md = Metadata(run_id=77, message_id=f"msg-{kind}-{server_round}-{time.time_ns()}", src_node_id=0,
                  dst_node_id=node_id, reply_to_message_id="", group_id=str(server_round),
                  created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind)
    return Message(content=content, metadata=md)


def _context(node_id: int = 1001, partition: int = 0) -> Context:
    return Context(run_id=77, node_id=node_id, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _assert_reply_addressing(reply: Message, msg: Message) -> None:
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id
    assert reply.metadata.src_node_id == msg.metadata.dst_node_id
    assert reply.metadata.message_type == msg.metadata.message_type
    assert reply.metadata.run_id == msg.metadata.run_id


def _assert_no_per_example_data(metrics: MetricRecord, n_examples: set[int]) -> None:
    for key, value in metrics.items():
        assert not isinstance(value, (str, bytes)), key
        if isinstance(value, list):
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value), key
            assert len(value) not in n_examples, f"{key} has one value per example"
        else:
            assert isinstance(value, (int, float)), key


def test_train_handler_reply_carries_only_weights_and_allowed_metrics(tmp_path: Path) -> None:
    study = _study()
    msg = _message(study, MessageType.TRAIN, tmp_path)
    site = simulated_site(study, partition_id=0, num_partitions=3, state_dir=tmp_path)
    assert len(site.data.train) == N_TRAIN and len(site.data.val) == N_VAL
    expected = _global_arrays(study)

    reply = client_app.train(msg, _context())

    assert not reply.has_error(), reply.error if reply.has_error() else None
    _assert_reply_addressing(reply, msg)
    content = reply.content
    assert set(content.keys()) - {"receipt"} == {"arrays", "metrics"}
    assert content.array_records.keys() == {"arrays"} and content.metric_records.keys() == {"metrics"}
    assert set(content.config_records.keys()) <= {"receipt"}
    arrays = content["arrays"]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == {k: tuple(a.shape) for k, a in expected.items()}
    for name, arr in arrays.items():
        shape = tuple(arr.shape)
        assert N_TRAIN not in shape and N_VAL not in shape, (name, shape)
        assert shape[-2:] != (SIZE, SIZE), (name, shape)
    assert any(not np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in expected.keys())  # it trained
    metrics = content["metrics"]
    assert set(metrics.keys()) <= TRAIN_METRICS
    # the DP-released size (noise std 8), stored in the ledger and re-sent unchanged
    ledger = json.loads((tmp_path / "hospital-1" / "privacy-ledger.json").read_text())
    assert metrics["num-examples"] == ledger["released_size"]["value"] and abs(metrics["num-examples"] - N_TRAIN) < 64
    assert metrics["partition-id"] == 0 and metrics["round"] == 1
    assert 0 < metrics["epsilon"] <= 8.0 and 0 < metrics["study_epsilon"] <= metrics["study_epsilon_budget"] == 8.0
    # planned from the released size (noisy: below 4 x 16 the plan keeps 4 smaller batches per epoch)
    assert metrics["steps"] == sampling_plan(num_examples=int(metrics["num-examples"]), batch_size=16,
                                             local_epochs=1).steps
    assert "train_loss" not in metrics and "train_seconds" not in metrics
    _assert_no_per_example_data(metrics, {N_TRAIN, N_VAL})
    check_reply(content, kind="train", expected_shapes={k: tuple(a.shape) for k, a in expected.items()})
    # the ledger was written where the simulation said, for this hospital only
    assert (tmp_path / "hospital-1" / "privacy-ledger.json").exists()
    assert not (tmp_path / "hospital-2").exists()


def test_evaluate_handler_reply_carries_only_aggregate_metrics(tmp_path: Path) -> None:
    study = _study()
    client_app.train(_message(study, MessageType.TRAIN, tmp_path), _context())  # creates the ledger
    msg = _message(study, MessageType.EVALUATE, tmp_path)

    reply = client_app.app(msg, _context())  # through ClientApp dispatch, as Flower calls it

    assert not reply.has_error()
    _assert_reply_addressing(reply, msg)
    content = reply.content
    assert set(content.keys()) - {"receipt"} == {"metrics"}
    metrics = content["metrics"]
    assert set(metrics.keys()) <= EVAL_METRICS
    hist = np.asarray(metrics["histograms"]).reshape(2, 2, -1)
    assert metrics["num-examples"] == int(hist[0].sum())  # post-processing of the noisy histogram
    assert metrics["round"] == 1
    assert 0 < metrics["epsilon"] <= metrics["epsilon_budget"] == 8.0  # the validation account
    entries = json.loads((tmp_path / "hospital-1" / "privacy-ledger.json").read_text())["entries"]
    assert [e["account"] for e in entries if e["account"] == "val"] == ["val"]  # charged before release
    _assert_no_per_example_data(metrics, {N_TRAIN, N_VAL})
    check_reply(content, kind="evaluate")


def test_exhausted_site_replies_with_budget_error_not_content(tmp_path: Path) -> None:
    # A calibrated study uses (almost) the whole budget over its rounds; another study then cannot fit.
    study = _study(max_noise_multiplier=5.0)
    for rnd in (1, 2):
        first = client_app.train(_message(study, MessageType.TRAIN, tmp_path, server_round=rnd), _context())
        assert not first.has_error(), first.error.reason if first.has_error() else None
    ledger = tmp_path / "hospital-1" / "privacy-ledger.json"
    before = ledger.read_bytes()
    other = _study(max_noise_multiplier=5.0, max_grad_norm=0.5)
    msg = _message(other, MessageType.TRAIN, tmp_path, server_round=1, total=1)

    reply = client_app.train(msg, _context())  # the calibrated first run used the whole budget

    assert reply.has_error()
    assert not reply.has_content()
    assert reply.error.code == ERR_BUDGET == 4001
    assert "BudgetExceededError" in reply.error.reason
    _assert_reply_addressing(reply, msg)
    assert ledger.read_bytes() == before


def test_fixed_noise_over_budget_refused_before_training(tmp_path: Path) -> None:
    study = _study(noise_multiplier=0.0)  # zero noise: infinite epsilon

    reply = client_app.train(_message(study, MessageType.TRAIN, tmp_path), _context())

    assert reply.has_error() and reply.error.code == ERR_BUDGET
    data = json.loads((tmp_path / "hospital-1" / "privacy-ledger.json").read_text())
    assert [e for e in data["entries"] if e["study"] != "<dataset-size>"] == []
    assert data["studies"] == {}  # the refused round was not counted


def test_malformed_requests_get_protocol_errors(tmp_path: Path) -> None:
    study = _study()
    no_study = _message(study, MessageType.TRAIN, tmp_path, config={"server-round": 1, "total-rounds": 2,
                                                                     "study-id": "x", "sim-state-dir": str(tmp_path)})
    other = parse_study({**json.loads(json.dumps(STUDY)), "model": {"name": "cnn", "options": {"widths": [4]}}})
    wrong_model = _message(study, MessageType.TRAIN, tmp_path, arrays=_global_arrays(other))
    no_state_dir = _message(study, MessageType.TRAIN, tmp_path, config={
        "study": study.to_json(), "server-round": 1, "total-rounds": 2, "study-id": "x"})

    for msg in (no_study, wrong_model, no_state_dir):
        reply = client_app.train(msg, _context())
        assert reply.has_error() and reply.error.code == ERR_PROTOCOL, reply.error.reason
    assert not (tmp_path / "hospital-1" / "privacy-ledger.json").exists()  # nothing reserved for bad requests


# ------------------------------------------------------------------ scalar metrics stay scalar
@pytest.mark.parametrize(
    ("kind", "content"),
    [
        ("train", _train_reply(epsilon=[0.1 * i for i in range(64)])),
        ("evaluate", _eval_reply(epsilon=[0.0, 1.0, 1.0, 0.0] * 8)),
    ],
)
def test_scalar_metrics_may_not_be_lists(kind: str, content: RecordDict) -> None:
    with pytest.raises(ProtocolError):
        check_reply(content, kind=kind, expected_shapes=SHAPES if kind == "train" else None)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"w": torch.full((3, 4), float("nan")), "b": torch.zeros(3)}, "non-finite"),
        ({"w": torch.zeros(3, 4), "b": torch.tensor([0.0, float("inf"), 0.0])}, "non-finite"),
        ({"w": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(3)}, "float32"),
        ({"w": torch.zeros(3, 4, dtype=torch.int64), "b": torch.zeros(3)}, "float32"),
    ],
)
def test_the_node_never_sends_garbage_weights(arrays: dict, match: str) -> None:
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10, "round": 1})})
    with pytest.raises(ProtocolError, match=match):
        check_reply(content, kind="train", expected_shapes=SHAPES)
