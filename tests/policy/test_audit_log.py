"""The node's audit log: every tampering is detected; the CLI says which entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedrad.client.cli import main as node_main
from fedrad.client.governance.audit_log import AuditLog


def _content(seed: int) -> RecordDict:
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({"w": torch.from_numpy(rng.random((3, 2)).astype(np.float32)),
                          "b": torch.from_numpy(rng.random(2).astype(np.float32))})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5})})


@pytest.fixture(params=["unkeyed", "keyed"])
def log(tmp_path: Path, request: pytest.FixtureRequest) -> AuditLog:
    """The same log, unkeyed (simulation) and keyed by a node key outside the state folder."""
    key = tmp_path / "audit.key" if request.param == "keyed" else None
    log = AuditLog(tmp_path / "state" / "audit.jsonl", key_file=key)
    for i in range(4):
        log.append(study="s", round=i + 1, kind="train", content=_content(i), epsilon_before=float(i),
                   epsilon_after=float(i) + 1, policy_version="v1")
    log.append(study="s", round=5, kind="train", content=None, epsilon_before=4.0, epsilon_after=4.0,
               policy_version="v1", outcome="refused: budget")
    return log


def test_intact_log_verifies_and_records_what_was_sent(log: AuditLog) -> None:
    assert log.verify() == []
    first = log.entries()[0]
    assert [a["name"] for a in first["arrays"]] == ["b", "w"]
    assert first["arrays"][1]["shape"] == [3, 2] and first["bytes_sent"] == (6 + 2) * 4
    assert first["metrics"] == {"num-examples": 10, "train_loss": 0.5}
    assert log.entries()[-1]["outcome"].startswith("refused")


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def _write(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(line + "\n" for line in lines))


def test_edited_value_detected(log: AuditLog) -> None:
    lines = _lines(log)
    e = json.loads(lines[1])
    e["epsilon_after"] = 0.1
    lines[1] = json.dumps(e, sort_keys=True)
    _write(log, lines)
    assert any("line 2" in p and "edited" in p for p in log.verify())


def test_deleted_line_detected(log: AuditLog) -> None:
    lines = _lines(log)
    _write(log, lines[:2] + lines[3:])
    assert any("line 3" in p for p in log.verify())


def test_reordered_lines_detected(log: AuditLog) -> None:
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    assert log.verify()


def test_truncated_tail_detected(log: AuditLog) -> None:
    _write(log, _lines(log)[:-1])
    assert any("head records 5" in p for p in log.verify())


def test_forged_inserted_line_detected(log: AuditLog) -> None:
    lines = _lines(log)
    forged = json.loads(lines[0])
    forged["round"] = 99
    _write(log, lines[:1] + [json.dumps(forged)] + lines[1:])
    assert log.verify()


def test_cli_verify_exit_codes(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    key = ["--key", str(log.key_file)] if log.key_file else []
    assert node_main(["audit", "verify", str(log.path), *key]) == 0
    assert node_main(["audit", "show", str(log.path), *key]) == 0
    _write(log, _lines(log)[:-1])
    assert node_main(["audit", "verify", str(log.path), *key]) == 9
    assert "FAILED" in capsys.readouterr().err
