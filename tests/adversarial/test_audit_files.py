"""Security review findings 3 and 12: the audit log's files are never opened through a symlink, and
``audit verify`` reports (never crashes on) any bytes an attacker can put in the log.

3: whoever could write the state folder deleted log and head and planted ``audit.jsonl ->
~/.bash_aliases``; the next append wrote a coordinator-chosen study id (``$(id>/tmp/x)``) into it,
run when the shell sourced it. The same through the lock file (``audit.jsonl.lock``).
12: invalid UTF-8 or very deep JSON nesting in the log crashed ``audit verify``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from flwr.app import MetricRecord, RecordDict

from fedrad.client.cli import main as node_main
from fedrad.client.governance.audit_log import AuditLog
from fedrad.common.durable import UnsafeFileError, locked
from fedrad.common.errors import AuditError

STUDY = "$(id>/tmp/x)"


def _append(log: AuditLog, i: int, study: str = "s") -> None:
    log.append(study=study, round=i, kind="train", content=RecordDict({"metrics": MetricRecord({"round": i})}),
               epsilon_before=0.0, epsilon_after=1.0, policy_version="v1")


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    """A file of the node's user outside the state folder (a shell startup file)."""
    home = tmp_path / "home"
    home.mkdir()
    p = home / ".bash_aliases"
    p.write_text("alias ll='ls -l'\n")
    p.chmod(0o644)
    return p


@pytest.mark.parametrize("keyed", [True, False])
def test_planted_symlink_log_is_refused_and_its_target_untouched(tmp_path: Path, victim: Path, keyed: bool) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state / "audit.jsonl", key_file=(tmp_path / "audit.key") if keyed else None)
    log.path.symlink_to(victim)  # log and head deleted, the log planted as a link

    with pytest.raises(AuditError, match="symlink"):
        _append(log, 1, study=STUDY)

    assert victim.read_text() == "alias ll='ls -l'\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert log.path.is_symlink() and not log.head_path.exists()
    assert any("symlink" in p for p in log.verify())


def test_planted_symlink_lock_is_refused_and_its_target_untouched(tmp_path: Path, victim: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state / "audit.jsonl", key_file=tmp_path / "audit.key")
    (state / "audit.jsonl.lock").symlink_to(victim)

    with pytest.raises(UnsafeFileError, match="symlink"):
        _append(log, 1, study=STUDY)

    assert victim.read_text() == "alias ll='ls -l'\n" and not log.path.exists()
    other = tmp_path / "elsewhere" / "x.json"  # every locked() file (ledger, allow-list) alike
    other.parent.mkdir()
    other.with_name("x.json.lock").symlink_to(victim)
    with pytest.raises(UnsafeFileError):
        with locked(other):
            pass
    assert victim.read_text() == "alias ll='ls -l'\n"


def test_planted_fifo_or_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state / "audit.jsonl", key_file=tmp_path / "audit.key")
    os.mkfifo(log.path)
    with pytest.raises(AuditError, match="not a regular file"):
        _append(log, 1)
    assert any("not a regular file" in p for p in log.verify())
    log.path.unlink()
    log.path.mkdir()
    with pytest.raises(AuditError):
        _append(log, 1)


def test_symlinked_head_is_never_read_through(tmp_path: Path, victim: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state / "audit.jsonl", key_file=tmp_path / "audit.key")
    _append(log, 1)
    log.head_path.unlink()
    log.head_path.symlink_to(victim)
    with pytest.raises(AuditError, match="symlink"):
        _append(log, 2)
    assert victim.read_text() == "alias ll='ls -l'\n" and len(log.path.read_bytes().splitlines()) == 1
    assert any("symlink" in p for p in log.verify())


def test_log_is_private_and_entries_are_plain_ascii_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state" / "audit.jsonl", key_file=tmp_path / "audit.key")
    (tmp_path / "state").mkdir()
    old = os.umask(0o022)
    try:
        _append(log, 1, study=STUDY + "\n; rm -rf ~ \x00 é")
    finally:
        os.umask(old)
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "audit.jsonl.lock").stat().st_mode) == 0o600
    raw = log.path.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 1 and json.loads(raw)["study"].startswith(STUDY)
    assert log.verify() == []


# ---------------------------------------------------------------------------- finding 12
@pytest.mark.parametrize("line", [
    b"\xff\xfe not utf-8 \x80",
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b'{"a": ' + b"[" * 990 + b"]" * 990 + b"}",
    b"\x00\x00",
])
def test_verify_reports_any_bytes_in_the_log(tmp_path: Path, line: bytes,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = tmp_path / "node.yaml"
    yaml_path.write_text("site: hospital-a\nsuperlink: 127.0.0.1:9092\ninsecure: true\ndata: {path: site.npz}\n"
                         "state_dir: state\n")
    (tmp_path / "state").mkdir()
    log = AuditLog(tmp_path / "state" / "audit.jsonl", key_file=tmp_path / "audit.key")
    _append(log, 1)
    with open(log.path, "ab") as fh:
        fh.write(line + b"\n")

    problems = log.verify()
    entries = log.entries()

    assert any("line 2: not valid JSON" in p for p in problems) and entries[1]["_malformed_line"] == 2
    assert node_main(["audit", "verify", "--config", str(yaml_path)]) == AuditError.exit_code
    assert "FAILED verification" in capsys.readouterr().err
    with pytest.raises(AuditError):  # and the node writes nothing more onto it
        _append(log, 2)
