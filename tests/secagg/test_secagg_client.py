"""The hospital side of a SecAgg+ round, called directly (fast; no federation, no Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedrad.client.runtime import app as plain_app
from fedrad.client.runtime.secagg_app import ARRAY_NAMES_KEY, CAPTURE_ENV, refusals_as_errors, secagg_fit
from fedrad.common.config import parse_study
from fedrad.common.models import build_model
from fedrad.common.protocol import ERR_POLICY, ERR_PROTOCOL
from fedrad.server.secagg import ARRAY_NAMES_KEY as SERVER_ARRAY_NAMES_KEY
from tests.conftest import small_study_dict


def _request(config: dict[str, object], arrays: list[np.ndarray]) -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), keep_input=True)  # type: ignore[arg-type]
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def _context(tmp_path: Path) -> Context:
    state = RecordDict()
    state[RECORD_KEY_STATE] = ConfigRecord({"clipping_range": 1.0, "max_weight": 1000.0})
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=state,
                   run_config={})


@pytest.fixture()
def study_and_model():
    study = parse_study(small_study_dict(privacy={"enabled": True, "epsilon": 8.0, "noise_multiplier": 1.0}))
    torch.manual_seed(0)
    model = build_model(study.model.name, in_channels=1, num_classes=2, image_size=28, options=study.model.options)
    return study, model


def test_keys_agree_between_coordinator_and_hospital() -> None:
    assert ARRAY_NAMES_KEY == SERVER_ARRAY_NAMES_KEY


def test_fit_returns_the_dp_trained_update_not_the_weights(tmp_path: Path, study_and_model, monkeypatch) -> None:
    study, model = study_and_model
    names = list(model.state_dict())
    weights = [v.numpy().copy() for v in model.state_dict().values()]
    config = {"study": study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 2, "round-offset": 0,
              "sim-state-dir": str(tmp_path / "sites"), ARRAY_NAMES_KEY: json.dumps(names)}
    monkeypatch.setenv(CAPTURE_ENV, str(tmp_path / "cap"))
    reply = refusals_as_errors(_request(config, weights), _context(tmp_path), secagg_fit)
    assert not reply.has_error()
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert [u.shape for u in update] == [w.shape for w in weights]
    ledger = json.loads((tmp_path / "sites" / "hospital-1" / "privacy-ledger.json").read_text())
    # the released (noisy) training-set size, never the true 64; DP, accounted in the ledger
    assert fitres.num_examples == ledger["released_size"]["value"] and float(fitres.metrics["epsilon"]) > 0
    assert 0 < max(float(np.abs(u).max()) for u in update) < 1.0  # an update (small), not weights
    assert len([e for e in ledger["entries"] if e["study"] != "<dataset-size>"]) == 1
    with np.load(tmp_path / "cap" / "round-0001-hospital-1.npz") as z:  # the test hook
        np.testing.assert_array_equal(z["u0"], update[0])


def test_malformed_request_is_refused_with_the_protocol_code(tmp_path: Path, study_and_model) -> None:
    study, model = study_and_model
    weights = [v.numpy() for v in model.state_dict().values()]
    config = {"study": study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 2,
              "sim-state-dir": str(tmp_path / "sites")}  # no array names
    reply = refusals_as_errors(_request(config, weights), _context(tmp_path), secagg_fit)
    assert reply.has_error() and reply.error.code == ERR_PROTOCOL
    assert not (tmp_path / "sites" / "hospital-1" / "privacy-ledger.json").exists()  # nothing spent


def test_no_plaintext_capture_without_the_env_var(tmp_path: Path, study_and_model, monkeypatch) -> None:
    study, model = study_and_model
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    names = list(model.state_dict())
    config = {"study": study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 2,
              "sim-state-dir": str(tmp_path / "sites"), ARRAY_NAMES_KEY: json.dumps(names)}
    reply = secagg_fit(_request(config, [v.numpy() for v in model.state_dict().values()]), _context(tmp_path))
    assert not reply.has_error()
    assert not list(tmp_path.rglob("round-*.npz"))


def _policy_study(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  require_secure_aggregation: true\n", encoding="utf-8")
    return parse_study(small_study_dict(federation={"min_hospitals": 2},
                                        privacy={"enabled": True, "epsilon": 8.0, "noise_multiplier": 1.0},
                                        simulation={"node_policy": str(policy)}))


def test_policy_requiring_secure_aggregation_refuses_the_plain_app(tmp_path: Path) -> None:
    study = _policy_study(tmp_path)
    torch.manual_seed(0)
    model = build_model(study.model.name, in_channels=1, num_classes=2, image_size=28, options=study.model.options)
    config = {"study": study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 2,
              "sim-state-dir": str(tmp_path / "sites")}
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}),
                  metadata=meta)
    reply = plain_app.train(msg, _context(tmp_path))
    assert reply.has_error() and reply.error.code == ERR_POLICY
    assert "require_secure_aggregation" in reply.error.reason


def test_policy_requiring_secure_aggregation_accepts_the_secagg_app(tmp_path: Path) -> None:
    study = _policy_study(tmp_path)
    torch.manual_seed(0)
    model = build_model(study.model.name, in_channels=1, num_classes=2, image_size=28, options=study.model.options)
    config = {"study": study.to_json(), "study-id": "s1", "server-round": 1, "total-rounds": 2,
              "sim-state-dir": str(tmp_path / "sites"), ARRAY_NAMES_KEY: json.dumps(list(model.state_dict()))}
    reply = refusals_as_errors(_request(config, [v.numpy() for v in model.state_dict().values()]),
                               _context(tmp_path), secagg_fit)
    assert not reply.has_error(), reply.error.reason
