"""Edge cases of the node policy and the audit log that the first tests leave open.

Covers: the exact refusal wording, require_dp=false still enforcing the other rules, the policy
CLI, damaged / partially truncated / forged-and-rechained audit lines, NaN metrics, concurrent
appends from several processes, and known gaps pinned as strict xfails (remove the marker once
fixed).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from pydantic import ValidationError

from fedrad.client.cli import main as node_main
from fedrad.client.governance.audit_log import AuditLog, _digest
from fedrad.client.governance.node_policy import NodePolicy, check_request, load_policy
from fedrad.common.config import parse_study
from fedrad.common.errors import AuditError, ConfigError, FedradError, PolicyViolation

# ----------------------------------------------------------------------------- policy


def _study(**over: dict) -> object:
    base = {"federation": {"rounds": 5, "min_hospitals": 2}, "privacy": {"enabled": False},
            "model": {"name": "cnn"}, "training": {"batch_size": 64}}
    for section, vals in over.items():
        base.setdefault(section, {}).update(vals)
    return parse_study(base)


def test_refusal_names_rule_and_both_values() -> None:
    policy = NodePolicy(require_dp=False, max_rounds=20)
    with pytest.raises(PolicyViolation) as err:
        check_request(policy=policy, study=_study(federation={"rounds": 50}), study_id="s", ledger=None, plan=None)
    assert isinstance(err.value, FedradError) and err.value.exit_code == 8
    assert err.value.rule == "max_rounds"
    assert str(err.value) == "rule max_rounds: study asks for 50 rounds, policy allows 20"


def test_dp_optional_policy_accepts_non_dp_study_but_keeps_other_rules() -> None:
    policy = NodePolicy(require_dp=False, allowed_models=("cnn",), min_hospitals=2)
    check_request(policy=policy, study=_study(), study_id="s", ledger=None, plan=None)  # accepted
    with pytest.raises(PolicyViolation) as err:
        check_request(policy=policy, study=_study(model={"name": "resnet"}), study_id="s", ledger=None, plan=None)
    assert err.value.rule == "allowed_models"


def test_dp_required_refuses_non_dp_study_first() -> None:
    with pytest.raises(PolicyViolation) as err:
        check_request(policy=NodePolicy(), study=_study(), study_id="s", ledger=None, plan=None)
    assert err.value.rule == "require_dp"


@pytest.mark.parametrize("standalone", [True, False])
def test_policy_file_standalone_or_under_policy_key(tmp_path: Path, standalone: bool) -> None:
    body = "max_rounds: 7\nallowed_models: [cnn]\n"
    text = body if standalone else "policy:\n" + "".join("  " + line + "\n" for line in body.splitlines())
    p = tmp_path / "p.yaml"
    p.write_text(text)
    policy = load_policy(p)
    assert policy.max_rounds == 7 and policy.allowed_models == ("cnn",)
    assert policy.version() == NodePolicy(max_rounds=7, allowed_models=("cnn",)).version()
    assert len(policy.version()) == 64


def test_policy_is_frozen() -> None:
    with pytest.raises(ValidationError):
        NodePolicy().max_rounds = 1  # type: ignore[misc]


def test_policy_show_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("policy:\n  max_rounds: 7\n")
    assert node_main(["policy", "show", str(good)]) == 0
    out = capsys.readouterr().out
    assert "max_rounds: 7" in out and load_policy(good).version()[:16] in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  max_rounds: zero\n")
    assert node_main(["policy", "show", str(bad)]) == ConfigError.exit_code
    assert "max_rounds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- audit


def _content(seed: int, loss: float = 0.5) -> RecordDict:
    rng = np.random.default_rng(seed)
    arrays = ArrayRecord({"w": torch.from_numpy(rng.random((3, 2)).astype(np.float32))})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "train_loss": loss})})


def _filled(tmp_path: Path, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append(study="s", round=i + 1, kind="train", content=_content(i), epsilon_before=float(i),
                   epsilon_after=float(i) + 1, policy_version="v1")
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def test_array_hash_is_over_the_bytes_sent(tmp_path: Path) -> None:
    log = _filled(tmp_path, 1)
    e = log.entries()[0]
    w = np.random.default_rng(0).random((3, 2)).astype(np.float32)
    assert e["arrays"] == [{"name": "w", "shape": [3, 2], "dtype": "float32", "bytes": 24,
                            "sha256": hashlib.sha256(w.tobytes()).hexdigest()}]
    assert e["hash"] == _digest(e) and e["prev_hash"] == "0" * 64


def test_nan_metric_is_recorded_as_null_and_verifies(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(study="s", round=1, kind="evaluate", content=_content(0, loss=float("nan")), epsilon_before=None,
               epsilon_after=None, policy_version="")
    assert log.entries()[0]["metrics"]["train_loss"] is None
    assert log.verify() == []


def test_garbled_middle_line_named(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    lines = _lines(log)
    lines[1] = lines[1][:-5]
    log.path.write_text("\n".join(lines) + "\n")
    problems = log.verify()
    assert any(p.startswith("line 2") and "JSON" in p for p in problems)
    assert any(p.startswith("line 3") for p in problems)  # the next one no longer chains


def test_partially_truncated_last_line_detected(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    data = log.path.read_bytes()
    log.path.write_bytes(data[: len(data) - 40])  # cut inside the last entry, no trailing newline
    problems = log.verify()
    assert any(p.startswith("line 4") for p in problems)
    assert any("head records 4" in p for p in problems)


def test_forged_entry_with_valid_chain_appended_is_detected_by_head(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    last = log.entries()[-1]
    forged = dict(last, seq=5, round=5, prev_hash=last["hash"], epsilon_after=0.0)
    forged["hash"] = _digest(forged)
    with open(log.path, "a") as fh:
        fh.write(json.dumps(forged, sort_keys=True) + "\n")
    assert any("head records 4" in p for p in log.verify())


def test_reordered_lines_name_the_lines(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("\n".join(lines) + "\n")
    problems = log.verify()
    assert any(p.startswith("line 2") for p in problems) and any(p.startswith("line 3") for p in problems)


def test_missing_log_cli_exit_code(tmp_path: Path) -> None:
    assert node_main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == AuditError.exit_code


def _append_many(path: str, worker: int, n: int, key: str | None = None) -> None:
    log = AuditLog(path, key_file=None if key is None else Path(key))
    for i in range(n):
        log.append(study=f"s{worker}", round=i + 1, kind="train", content=None, epsilon_before=None,
                   epsilon_after=None, policy_version="v", outcome="refused: test")


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_concurrent_appends_from_processes_keep_one_chain(tmp_path: Path, keyed: bool) -> None:
    path = str(tmp_path / "audit.jsonl")
    key = str(tmp_path / "audit.key") if keyed else None  # keyed: the workers race to create the key, too
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w, 15, key)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    log = AuditLog(path, key_file=None if key is None else Path(key))
    assert log.verify() == []
    assert len(log.entries()) == 60


def test_non_object_json_line_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    lines = _lines(log)
    lines[1] = "42"
    log.path.write_text("\n".join(lines) + "\n")
    assert any(p.startswith("line 2") for p in log.verify())


def test_crash_between_line_and_head_does_not_fork_the_chain(tmp_path: Path) -> None:
    log = _filled(tmp_path, 2)
    stale_head = log.head_path.read_bytes()
    log.append(study="s", round=3, kind="train", content=_content(3), epsilon_before=2.0, epsilon_after=3.0,
               policy_version="v1")
    log.head_path.write_bytes(stale_head)  # as if the process died before os.replace of the head
    try:
        log.append(study="s", round=4, kind="train", content=_content(4), epsilon_before=3.0, epsilon_after=4.0,
                   policy_version="v1")
    except AuditError:
        return  # refusing to write on an inconsistent log is acceptable
    assert log.verify() == []  # otherwise the head must have been rolled forward first
