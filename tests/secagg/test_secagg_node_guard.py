"""One SecAgg+ round among three in-process hospitals (the real ClientApp, Flower's real mod),
driven by a hand-rolled coordinator: what leaves a hospital, the receipt beside the masked vector,
a restarted node, malformed masked replies (fast; no Ray). The lying coordinator's attacks are in
``tests/adversarial/test_secagg_coordinator.py``, which reuses :class:`Round`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedrad.client.runtime import app as plain_app
from fedrad.client.runtime import secagg_app
from fedrad.common.config import parse_study
from fedrad.common.errors import ProtocolError
from fedrad.common.models import build_model
from fedrad.common.protocol import ERR_PROTOCOL
from fedrad.server.secagg import ARRAY_NAMES_KEY, check_masked_reply, masked_stats
from tests.conftest import small_study_dict

NODES = (11, 22, 33)
Q, MOD = 2**22, 2**32
RECEIPT = {"audit-head": "ab" * 32, "audit-count": 3}


def _msg(nid: int, content: RecordDict) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{nid}-{time.monotonic_ns()}", src_node_id=0, dst_node_id=nid,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                    message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def _stage(stage: str, **values: Any) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **values})})


def _setup(*, sample: int = 3, shares: int | None = None, threshold: int = 3) -> RecordDict:
    shares = sample if shares is None else shares
    return _stage(Stage.SETUP, **{Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
                                  Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: Q, Key.MOD_RANGE: MOD,
                                  Key.MAX_WEIGHT: 1000.0})


class Round:
    """Hospitals (simulated sites; three by default) and their SecAgg+ state, as the SuperNodes
    would hold it."""

    def __init__(self, tmp_path: Path, nodes: tuple[int, ...] = NODES) -> None:
        self.nodes = nodes
        self.study = parse_study(small_study_dict(
            federation={"num_hospitals": len(nodes), "min_hospitals": 3},
            privacy={"enabled": True, "epsilon": 8.0, "noise_multiplier": 1.0},
            secure_aggregation={"enabled": True}))
        torch.manual_seed(0)
        m = self.study.model
        self.model = build_model(m.name, in_channels=1, num_classes=2, image_size=28, options=m.options)
        self.tmp = tmp_path
        self.ctx = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": len(nodes)},
                                 state=RecordDict(), run_config={}) for i, nid in enumerate(nodes)}

    def send(self, nid: int, content: RecordDict) -> Message:
        return secagg_app.train(_msg(nid, content), self.ctx[nid])

    def share_keys(self, threshold: int = 3) -> dict[int, tuple[list[int], list[bytes]]]:
        keys = {}
        for nid in self.nodes:
            reply = self.send(nid, _setup(sample=len(self.nodes), threshold=threshold))
            assert not reply.has_error(), reply.error.reason
            cfg = reply.content[RECORD_KEY_CONFIGS]
            keys[nid] = [cfg[Key.PUBLIC_KEY_1], cfg[Key.PUBLIC_KEY_2]]
        shares = {}
        for nid in self.nodes:
            reply = self.send(nid, _stage(Stage.SHARE_KEYS, **{str(k): v for k, v in keys.items()}))
            assert not reply.has_error(), reply.error.reason
            cfg = reply.content[RECORD_KEY_CONFIGS]
            shares[nid] = (list(cfg[Key.DESTINATION_LIST]), list(cfg[Key.CIPHERTEXT_LIST]))
        return shares

    def collect(self, shares: dict[int, tuple[list[int], list[bytes]]]) -> dict[int, Message]:
        names = list(self.model.state_dict())
        weights = [v.numpy().copy() for v in self.model.state_dict().values()]
        config = {"study": self.study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 1,
                  "round-offset": 0, "sim-state-dir": str(self.tmp / "sites"), ARRAY_NAMES_KEY: json.dumps(names)}
        replies = {}
        for nid in self.nodes:
            srcs = [src for src, (dsts, _) in shares.items() for d in dsts if d == nid]
            cts = [ct for src, (dsts, c) in shares.items() for d, ct in zip(dsts, c) if d == nid]
            content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), config), keep_input=True)  # type: ignore[arg-type]
            content[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                                                        Key.CIPHERTEXT_LIST: cts, Key.SOURCE_LIST: srcs})
            replies[nid] = self.send(nid, content)
        return replies

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(v.shape) for v in self.model.state_dict().values()]


@pytest.fixture()
def with_receipt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train replies carry the audit receipt (the node's contract; added here to the real reply)."""
    real = plain_app.train_reply

    def train_reply(msg: Message, context: Context, *, secure_aggregation: bool = False) -> Message:
        reply = real(msg, context, secure_aggregation=secure_aggregation)
        if not reply.has_error():
            reply.content[secagg_app.RECEIPT_KEY] = ConfigRecord(dict(RECEIPT))
        return reply

    monkeypatch.setattr(plain_app, "train_reply", train_reply)


def test_masked_reply_carries_only_the_contract_and_the_receipt(tmp_path: Path, with_receipt: None) -> None:
    r = Round(tmp_path)
    replies = r.collect(r.share_keys())
    for nid, reply in replies.items():
        assert not reply.has_error(), reply.error.reason
        content = reply.content
        assert set(content.keys()) == secagg_app.FITRES_RECORDS | {RECORD_KEY_CONFIGS, secagg_app.RECEIPT_KEY}
        assert dict(content[secagg_app.RECEIPT_KEY]) == RECEIPT  # the receipt survived the mod
        assert all(len(a) == 0 for a in content.array_records.values())  # no plaintext arrays left
        vectors = check_masked_reply(content, shapes=r.shapes(), modulus=MOD)  # the coordinator accepts it
        stats = masked_stats(vectors, quantization_range=Q, modulus=MOD)
        assert stats["share_above_quantization_range"] > 0.99 and abs(stats["mean_over_modulus"] - 0.5) < 0.05
    # the unmask stage then works with every hospital alive
    for nid in NODES:
        reply = r.send(nid, _stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: list(NODES), Key.DEAD_NODE_ID_LIST: []}))
        assert not reply.has_error(), reply.error.reason


def test_a_restarted_node_drops_out_of_the_round(tmp_path: Path) -> None:
    """Context.state is lost when a SuperNode restarts: the next stage of that round fails."""
    r = Round(tmp_path)
    shares = r.share_keys()
    r.ctx[22] = Context(run_id=1, node_id=22, node_config={"partition-id": 1, "num-partitions": 3},
                        state=RecordDict(), run_config={})  # the restart
    replies = r.collect(shares)
    assert replies[22].has_error()
    assert not (tmp_path / "sites" / "hospital-2" / "privacy-ledger.json").exists()  # refused before spending
    assert not replies[11].has_error() and not replies[33].has_error()
    # and the next round starts afresh with a new setup
    assert not r.send(22, _setup()).has_error()


def _good_reply(r: Round) -> RecordDict:
    return r.collect(r.share_keys())[11].content


@pytest.mark.parametrize("tamper", ["extra-record", "arrays", "metric", "shape", "range", "receipt"])
def test_coordinator_drops_a_malformed_masked_reply(tmp_path: Path, with_receipt: None, tamper: str) -> None:
    r = Round(tmp_path)
    content = _good_reply(r)
    check_masked_reply(content, shapes=r.shapes(), modulus=MOD)
    masked = list(content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])  # type: ignore[arg-type]
    if tamper == "extra-record":
        content["notes"] = MetricRecord({"x": 1.0})
    elif tamper == "arrays":
        content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([np.ones(3, dtype=np.float32)]), keep_input=True)
    elif tamper == "metric":
        content["fitres.metrics"]["patient_age"] = 42
    elif tamper == "shape":
        content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = masked[:-1]
    elif tamper == "range":
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes
        first = bytes_to_ndarray(masked[1]).astype(np.int64) + MOD
        content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [masked[0], ndarray_to_bytes(first), *masked[2:]]
    elif tamper == "receipt":
        content[secagg_app.RECEIPT_KEY] = ConfigRecord({"audit-head": "XYZ", "audit-count": 1})
    with pytest.raises(ProtocolError):
        check_masked_reply(content, shapes=r.shapes(), modulus=MOD)


def test_check_outgoing_stops_anything_beyond_the_contract(tmp_path: Path, with_receipt: None) -> None:
    r = Round(tmp_path)
    reply = r.collect(r.share_keys())[11]
    secagg_app.check_outgoing(reply)
    reply.content["fitres.metrics"]["train_seconds_per_example"] = 0.1
    with pytest.raises(ProtocolError, match="allow-list"):
        secagg_app.check_outgoing(reply)
