"""The real ClientApp under a node policy: train refused before anything is spent; evaluate too.

Drives ``fedrad.client.runtime.app`` with Flower messages as the simulation delivers them (the node
policy comes from ``simulation.node_policy``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    RecordDict,
)

from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime import app as client_app
from fedrad.common.config import StudyConfig, parse_study
from fedrad.common.models import build_model
from fedrad.common.protocol import ERR_POLICY

SIZE = 28


def _study(policy_path: Path, **privacy: object) -> StudyConfig:
    d = {
        "federation": {"num_hospitals": 3, "rounds": 2, "seed": 3, "min_hospitals": 2},
        "model": {"name": "cnn", "options": {"widths": [8, 16], "dense": 16}},
        "data": {"max_train_per_hospital": 64, "max_val_per_hospital": 32, "class_names": ["normal", "pneumonia"],
                 "partition": {"scheme": "iid", "min_per_hospital": 16}},
        "privacy": {"enabled": True, "epsilon": 8.0, **privacy},
        "training": {"batch_size": 16, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1},
        "simulation": {"node_policy": str(policy_path)},
    }
    return parse_study(json.loads(json.dumps(d)))


def _message(study: StudyConfig, kind: str, state_dir: Path) -> Message:
    torch.manual_seed(0)
    m = build_model(study.model.name, in_channels=1, num_classes=2, image_size=SIZE, options=study.model.options)
    cfg = {"study": study.to_json(), "server-round": 1, "total-rounds": 2, "study-id": "unit-study",
           "round-offset": 0, "sim-state-dir": str(state_dir)}
    content = RecordDict({"arrays": ArrayRecord(m.state_dict()), "config": ConfigRecord(cfg)})
    md = Metadata(run_id=77, message_id=f"msg-{kind}-{time.time_ns()}", src_node_id=0, dst_node_id=1001,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind)
    return Message(content=content, metadata=md)


def _context() -> Context:
    return Context(run_id=77, node_id=1001, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _policy(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


def _site_files(state_dir: Path) -> tuple[list[Path], list[Path]]:
    return sorted(state_dir.rglob("audit.jsonl")), sorted(state_dir.rglob("privacy-ledger.json"))


def test_train_outside_policy_is_refused_audited_and_spends_nothing(tmp_path: Path) -> None:
    study = _study(_policy(tmp_path, "policy:\n  allowed_models: [resnet]\n"))
    state = tmp_path / "state"
    reply = client_app.train(_message(study, "train", state), _context())
    assert reply.has_error() and reply.error.code == ERR_POLICY
    assert "rule allowed_models" in reply.error.reason
    audits, ledgers = _site_files(state)
    assert len(audits) == 1
    log = AuditLog(audits[0], key_file=audits[0].parent / "audit.key")  # simulation: the site's key
    assert log.verify() == []
    (entry,) = log.entries()
    assert entry["outcome"].startswith("refused: rule allowed_models") and entry["arrays"] == []
    assert entry["policy_version"]
    for ledger in ledgers:  # the policy is checked before the round is reserved
        assert json.loads(ledger.read_text())["history"] == []


def test_train_inside_policy_is_sent_and_audited(tmp_path: Path) -> None:
    study = _study(_policy(tmp_path, "policy:\n  max_epsilon_per_study: 8\n  max_epsilon_lifetime: 8\n"))
    state = tmp_path / "state"
    reply = client_app.train(_message(study, "train", state), _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    (audit,) = _site_files(state)[0]
    (entry,) = AuditLog(audit).entries()
    assert entry["outcome"] == "sent" and entry["arrays"] and entry["epsilon_after"] > 0


def test_evaluate_outside_policy_is_refused(tmp_path: Path) -> None:
    study = _study(_policy(tmp_path, "policy:\n  allowed_models: [resnet]\n"))
    reply = client_app.evaluate_global(_message(study, "evaluate", tmp_path / "state"), _context())
    assert reply.has_error() and reply.error.code == ERR_POLICY
