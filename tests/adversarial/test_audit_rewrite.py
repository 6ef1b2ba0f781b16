"""Issue 9, point 6: the node's audit log cannot be rewritten by whoever can write its state folder.

The attacker here can read and write everything in the state folder (log and head) and knows the
format and the code, but not the node's audit key (kept beside node.yaml, outside the state folder).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from flwr.app import MetricRecord, RecordDict

from fedrad.client.cli import main as node_main
from fedrad.client.governance.audit_key import KEY_BYTES, load_key, node_audit_key
from fedrad.client.governance.audit_log import KEYED, AuditHead, AuditLog, _digest, parse_receipt
from fedrad.client.runtime.node_config import load_node_config
from fedrad.common.errors import AuditError, ConfigError


def _append(log: AuditLog, i: int) -> AuditHead:
    return log.append(study="s", round=i, kind="train", content=RecordDict({"metrics": MetricRecord({"round": i})}),
                      epsilon_before=float(i - 1), epsilon_after=float(i), policy_version="v1")


@pytest.fixture()
def node(tmp_path: Path) -> Path:
    yaml_path = tmp_path / "node" / "node.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text("site: hospital-a\nsuperlink: 127.0.0.1:9092\ninsecure: true\ndata: {path: site.npz}\n"
                         "state_dir: state\n")
    return yaml_path


@pytest.fixture()
def log(node: Path) -> AuditLog:
    """A keyed log of 4 entries, as the node writes it (key found from node.yaml)."""
    key = node_audit_key(node=load_node_config(node), node_yaml=node)
    log = AuditLog(node.parent / "state" / "audit.jsonl", key_file=key)
    for i in range(1, 5):
        _append(log, i)
    return log


def _lines(log: AuditLog) -> list[dict]:
    return [json.loads(x) for x in log.path.read_text().splitlines()]


def _rewrite(log: AuditLog, entries: list[dict], *, mac_key: bytes | None = None, head: bool = True) -> None:
    """What an attacker without the node's key can do: recompute every hash (sha256, or an HMAC
    under a key of their own), rechain, and write a matching head."""
    prev = "0" * 64
    for i, e in enumerate(entries, 1):
        e["seq"], e["prev_hash"] = i, prev
        if mac_key is None:
            e.pop("chain", None)
            e["hash"] = _digest(e)
        else:
            body = json.dumps({k: v for k, v in e.items() if k != "hash"}, sort_keys=True, separators=(",", ":"))
            e["hash"] = hmac.new(mac_key, b"fedrad-audit-entry\x00" + body.encode(), hashlib.sha256).hexdigest()
        prev = e["hash"]
    log.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    if head:
        log.head_path.write_text(json.dumps({"last_hash": prev, "count": len(entries)}))


def test_node_log_is_keyed_and_verifies(log: AuditLog) -> None:
    entries = _lines(log)
    assert all(e["chain"] == KEYED for e in entries) and log.verify() == []
    report = log.verify_report()
    assert report.keyed and report.entries == 4 and report.unkeyed_prefix == 0
    assert "mac" in json.loads(log.head_path.read_text())


@pytest.mark.parametrize("mac_key", [None, os.urandom(KEY_BYTES)], ids=["sha256-chain", "attacker-key"])
def test_full_rewrite_without_the_key_is_detected_and_never_adopted(log: AuditLog, mac_key: bytes | None) -> None:
    entries = _lines(log)
    entries[1]["epsilon_after"] = 0.0  # hide a spend
    _rewrite(log, entries, mac_key=mac_key)
    assert AuditLog(log.path).verify() == [] or mac_key is not None  # unkeyed eyes: a sha256 rewrite looks intact

    problems = log.verify()

    assert any("head not signed by the node's audit key" in p for p in problems)
    if mac_key is None:
        assert any("none of the 4 entries is keyed" in p for p in problems)
    else:
        assert all(any(p.startswith(f"line {i}:") and "keyed hash" in p for p in problems) for i in range(1, 5))
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match="not signed by the node's key"):
        _append(log, 5)
    assert log.path.read_bytes() == before  # evidence kept, nothing chained onto it


def test_forged_append_without_the_head_is_not_adopted(log: AuditLog) -> None:
    last = _lines(log)[-1]
    forged = dict(last, seq=5, round=5, prev_hash=last["hash"], epsilon_after=4.0)
    forged["hash"] = hashlib.sha256(b"no key").hexdigest()
    with open(log.path, "a") as fh:
        fh.write(json.dumps(forged, sort_keys=True) + "\n")

    with pytest.raises(AuditError, match="disagree"):
        _append(log, 6)

    assert len(_lines(log)) == 5  # the forged line stays as evidence
    problems = log.verify()
    assert any(p.startswith("line 5") and "keyed hash" in p for p in problems)
    assert any("head records 4" in p for p in problems)


def test_forged_append_with_a_forged_head_is_not_adopted(log: AuditLog) -> None:
    entries = _lines(log)
    forged = dict(entries[-1], seq=5, round=5, prev_hash=entries[-1]["hash"])
    forged["hash"] = _digest(forged)
    _rewrite(log, entries + [forged], mac_key=None, head=False)  # (rechains all: same as a rewrite)
    log.head_path.write_text(json.dumps({"last_hash": forged["hash"], "count": 5}))
    with pytest.raises(AuditError):
        _append(log, 6)
    assert log.verify()


@pytest.mark.parametrize("attack", ["edit", "insert", "delete", "reorder", "truncate", "truncate+head"])
def test_every_change_by_someone_without_the_key_is_detected(log: AuditLog, attack: str) -> None:
    lines = log.path.read_text().splitlines()
    if attack == "edit":
        e = json.loads(lines[2])
        e["epsilon_after"] = 0.5
        lines[2] = json.dumps(e, sort_keys=True)
    elif attack == "insert":
        lines.insert(1, lines[0])
    elif attack == "delete":
        del lines[1]
    elif attack == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:2]
        if attack == "truncate+head":  # head moved back to the kept entry, unsigned (the key is needed)
            log.head_path.write_text(json.dumps({"last_hash": json.loads(lines[-1])["hash"], "count": 2}))
    log.path.write_text("".join(x + "\n" for x in lines))

    assert log.verify()
    with pytest.raises(AuditError):
        _append(log, 9)


def test_receipts_detect_a_rollback_the_chain_cannot(log: AuditLog, node: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old_log, old_head = log.path.read_bytes(), log.head_path.read_bytes()
    receipt = _append(log, 5)
    assert receipt == AuditHead(_lines(log)[-1]["hash"], 5) and len(receipt.head) == 64
    assert log.check_receipt(receipt) == []
    cfg = ["--config", str(node)]
    assert node_main(["audit", "verify", *cfg, "--receipt", str(receipt)]) == 0
    out = capsys.readouterr().out
    assert "keyed" in out and "receipt" in out and "cannot detect" in out and "rollback" in out

    log.path.write_bytes(old_log)  # rolled back to an earlier state of its own: the chain alone is fine
    log.head_path.write_bytes(old_head)
    assert log.verify() == []
    assert any("only 4 entries" in p for p in log.check_receipt(receipt))
    assert node_main(["audit", "verify", *cfg, "--receipt", str(receipt)]) == AuditError.exit_code
    assert "rolled back" in capsys.readouterr().err

    other = _append(log, 5)  # the log went on differently: the coordinator's receipt no longer matches
    assert other.count == 5 and other.head != receipt.head
    assert any("rewritten or rolled back" in p for p in log.check_receipt(receipt))
    with pytest.raises(AuditError):
        parse_receipt("abc:1")
    assert node_main(["audit", "verify", *cfg, "--receipt", "xyz"]) == AuditError.exit_code


def test_cli_finds_log_and_key_from_node_yaml_and_needs_the_key(log: AuditLog, node: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert node_main(["audit", "verify", "--config", str(node)]) == 0
    assert node_main(["audit", "show", "--config", str(node)]) == 0
    capsys.readouterr()
    assert node_main(["audit", "verify", str(log.path)]) == AuditError.exit_code  # keyed, no key given
    assert "no key was given" in capsys.readouterr().err
    assert node_main(["audit", "verify", str(log.path), "--key", str(log.key_file)]) == 0


def test_unkeyed_log_says_what_it_cannot_detect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    _append(log, 1)
    assert node_main(["audit", "verify", str(log.path)]) == 0
    assert "UNKEYED" in capsys.readouterr().out and not log.verify_report().keyed


def test_keyed_log_refuses_writers_without_the_key(log: AuditLog) -> None:
    with pytest.raises(AuditError, match="keyed"):
        _append(AuditLog(log.path), 5)  # no key: would append an unkeyed entry
    assert log.key_file is not None
    moved = log.key_file.with_name("elsewhere")
    log.key_file.rename(moved)
    with pytest.raises(AuditError, match="key .* is missing"):
        _append(AuditLog(log.path, key_file=log.key_file), 5)
    assert not log.key_file.exists()  # no new key was made up (it would fork the log)
    assert any("cannot verify" in p for p in AuditLog(log.path, key_file=log.key_file).verify())


def test_interrupted_append_rolls_forward_only_its_own_entry(log: AuditLog) -> None:
    stale = log.head_path.read_bytes()
    _append(log, 5)
    log.head_path.write_bytes(stale)  # the process died between the line and the head
    _append(log, 6)
    assert log.verify() == [] and len(_lines(log)) == 6


def test_upgrade_from_an_unkeyed_log_pins_the_old_entries(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    old = AuditLog(path)
    for i in range(1, 3):
        _append(old, i)
    log = AuditLog(path, key_file=tmp_path / "audit.key")
    _append(log, 3)  # creates the key, chains onto the unkeyed entries
    report = log.verify_report()
    assert report.problems == [] and report.unkeyed_prefix == 2
    entries = _lines(log)
    entries[0]["epsilon_after"] = 0.0
    _rewrite(log, entries[:2], mac_key=None, head=False)
    log.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries[:2]) +
                        json.dumps(entries[2], sort_keys=True) + "\n")
    assert any(p.startswith("line 3") for p in log.verify())  # the keyed entry pins the old chain


# ---------------------------------------------------------------------------- the key file
def test_key_file_created_once_private_exclusive_and_random(tmp_path: Path) -> None:
    p = tmp_path / "audit.key"
    key, created = load_key(p, create=True)
    assert created and len(key) == KEY_BYTES and stat.S_IMODE(p.stat().st_mode) == 0o600
    again, created_again = load_key(p, create=True)
    assert again == key and not created_again  # never replaced
    other = tmp_path / "other.key"
    assert load_key(other, create=True)[0] != key


def test_key_file_refused_if_symlink_shared_short_or_missing(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    real.write_bytes(os.urandom(KEY_BYTES))
    real.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(AuditError, match="symlink"):
        load_key(link, create=True)
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "attacker-chosen")
    with pytest.raises(AuditError, match="symlink"):
        load_key(dangling, create=True)
    assert not (tmp_path / "attacker-chosen").exists()  # O_NOFOLLOW: nothing created through the link
    real.chmod(0o640)
    with pytest.raises(AuditError, match="group or others"):
        load_key(real, create=True)
    real.chmod(0o600)
    real.write_bytes(b"short")
    with pytest.raises(AuditError, match="fewer than"):
        load_key(real, create=False)
    with pytest.raises(AuditError, match="missing"):
        load_key(tmp_path / "none.key", create=False)
    folder = tmp_path / "dir.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(AuditError):
        load_key(folder, create=True)


def test_key_location_default_beside_node_yaml_and_never_in_the_state_folder(node: Path, tmp_path: Path) -> None:
    cfg = load_node_config(node)
    assert node_audit_key(node=cfg, node_yaml=node) == node.parent.resolve() / "audit.key"
    inside = node.with_name("inside.yaml")
    inside.write_text(node.read_text().replace("state_dir: state", "state_dir: ."))
    with pytest.raises(ConfigError, match="inside (the state folder|state_dir)"):
        node_audit_key(node=load_node_config(inside), node_yaml=inside)
    shutil.rmtree(node.parent / "state", ignore_errors=True)
