"""The node's audit trail: an append-only, chained record of every message it sends.

One JSON object per line. Each entry holds what was sent (array names, shapes, dtypes, byte
count and sha256; metric names and values), the study and round, epsilon before and after, the
node policy's version, the previous entry's hash and its own hash. A sidecar head file holds the
last hash and the entry count, written atomically, so truncating the log is detected too.

**Keyed** (``key_file`` given; every deployed node): each entry's hash is an HMAC-SHA256, keyed by
the node's audit key (:mod:`fedrad.client.audit_key`, kept outside the state folder), of its
canonical JSON without the hash; entries say ``"chain": "hmac-sha256"``; the head file carries an
HMAC of (last hash, count) too. Whoever can write the state folder but does not hold the key
cannot edit, insert, delete, reorder or append an entry, nor truncate the log, without
:meth:`AuditLog.verify` finding it; and :meth:`AuditLog.append` never chains onto anything it did
not write itself: it writes only onto a log (and head) that verifies under the key, else it raises
:class:`AuditError` and nothing is written (the log is kept as it is, as evidence; nothing more is
sent until an operator has looked, see ``fedrad-node audit verify``). What a key cannot show: a
rollback of log and head together to an earlier state of their own (deleting both included, or a
truncation right after the last receipt the coordinator got), and anything done by someone holding the key. Every reply
therefore carries the head (:class:`AuditHead`, the receipt): the coordinator's governance report
anchors the log off the machine, and ``fedrad-node audit verify --receipt HEAD:COUNT`` checks a
receipt against the log.

**Unkeyed** (no key file: simulation and tests): the hash is a plain sha256, which detects damage
and careless edits but not a rewrite (anyone can recompute it); :meth:`AuditLog.verify` says so.

Upgrading a node with an unkeyed log: the append that creates the key chains its first keyed
entry onto the unkeyed ones (that entry's HMAC covers their last hash, so from then on they cannot
be changed undetected either); once the key exists an unkeyed last line is never adopted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedrad.common.durable import atomic_write_json, locked
from fedrad.common.errors import AuditError

from .audit_key import load_key

GENESIS = "0" * 64
#: The ``chain`` field of keyed entries.
KEYED = "hmac-sha256"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditHead:
    """The log's head right after an append: the last entry's hash and the number of entries."""

    head: str
    count: int

    def __str__(self) -> str:
        return f"{self.head}:{self.count}"


@dataclass(frozen=True)
class AuditReport:
    """What :meth:`AuditLog.verify_report` found."""

    entries: int
    keyed: bool
    #: Lines written before the node had its key (upgraded nodes; pinned by the first keyed entry).
    unkeyed_prefix: int
    problems: list[str] = field(default_factory=list)


def _canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(entry: dict[str, Any]) -> str:
    """An unkeyed entry's hash: sha256 of its canonical JSON without the hash."""
    return hashlib.sha256(_canonical(entry)).hexdigest()


def _mac(key: bytes, entry: dict[str, Any]) -> str:
    """A keyed entry's hash: HMAC-SHA256 of its canonical JSON without the hash."""
    return hmac.new(key, b"fedrad-audit-entry\x00" + _canonical(entry), hashlib.sha256).hexdigest()


def _head_mac(key: bytes, last_hash: str, count: int) -> str:
    return hmac.new(key, f"fedrad-audit-head\x00{last_hash}\x00{int(count)}".encode(), hashlib.sha256).hexdigest()


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def parse_receipt(text: str) -> AuditHead:
    """``HEAD:COUNT`` (as in the coordinator's governance report) -> :class:`AuditHead`."""
    head, sep, count = text.strip().partition(":")
    head = head.lower()
    if not sep or len(head) != 64 or any(c not in "0123456789abcdef" for c in head) or not count.isdigit():
        raise AuditError(f"receipt {text!r}: expected HEAD:COUNT (64 hex digits, a colon, an entry count)")
    if int(count) < 1:
        raise AuditError(f"receipt {text!r}: the count is at least 1")
    return AuditHead(head, int(count))


class AuditLog:
    def __init__(self, path: str | Path, *, key_file: Path | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.key_file = None if key_file is None else Path(key_file)
        self._key: bytes | None = None

    @property
    def keyed(self) -> bool:
        return self.key_file is not None

    # ------------------------------------------------------------------ key and head
    def _load_key(self, *, create: bool) -> tuple[bytes, bool]:
        if self._key is not None:
            return self._key, False
        assert self.key_file is not None
        if not create or self.key_file.exists() or self.key_file.is_symlink():
            key, created = load_key(self.key_file, create=False)
        else:
            if self._has_keyed_entries():
                raise AuditError(f"{self.path}: the log is keyed but its key {self.key_file} is missing; refusing to "
                                 "write (restore the key file; a new key would fork the log)")
            key, created = load_key(self.key_file, create=True)
        self._key = key
        return key, created

    def _has_keyed_entries(self) -> bool:
        return any(e.get("chain") == KEYED for e in self.entries())

    def _read_head(self) -> tuple[str, int, str | None]:
        if not self.head_path.exists():
            return GENESIS, 0, None
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            mac = head.get("mac")
            return str(head["last_hash"]), int(head["count"]), (None if mac is None else str(mac))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise AuditError(f"{self.head_path}: unreadable audit head ({exc})") from None

    def _write_head(self, last_hash: str, count: int, key: bytes | None) -> None:
        data: dict[str, Any] = {"last_hash": last_hash, "count": count}
        if key is not None:
            data["mac"] = _head_mac(key, last_hash, count)
        atomic_write_json(self.head_path, data)

    def head(self) -> AuditHead:
        """The head as recorded in the head file (not verified; see :meth:`verify`)."""
        last, count, _ = self._read_head()
        return AuditHead(last, count)

    def _valid(self, entry: dict[str, Any], key: bytes | None) -> bool:
        """Whether ``entry``'s hash verifies: under the key if given (then it must be keyed)."""
        if key is not None:
            return entry.get("chain") == KEYED and hmac.compare_digest(_mac(key, entry), str(entry.get("hash")))
        return entry.get("chain") != KEYED and _digest(entry) == entry.get("hash")

    def _consistent_head(self, key: bytes | None, *, key_created: bool) -> tuple[str, int]:
        """The head to chain onto, after checking it against the log's last line (lock held).

        A crash between writing a line and replacing the head leaves exactly one valid entry past
        the head: the head is rolled forward (keyed: only if that entry verifies under the key, so
        an entry someone else appended is never adopted). Any other disagreement means the log was
        damaged or tampered with: refuse to write (nothing is sent unaudited) rather than fork the
        chain, and leave every file as it is (evidence).
        """
        prev, count, mac = self._read_head()
        last, n = self._tail()
        if key is None and mac is not None:
            raise AuditError(f"{self.path}: this log is keyed; refusing to append to it without the node's audit key")
        upgrading = key is not None and key_created and mac is None  # first keyed append onto an unkeyed log
        if key is not None and not upgrading and count and (
                mac is None or not hmac.compare_digest(mac, _head_mac(key, prev, count))):
            raise AuditError(f"{self.head_path}: the audit head is not signed by the node's key {self.key_file} "
                             "(replaced or forged, or written before the node had its key); refusing to write. Run "
                             "'fedrad-node audit verify --config node.yaml' and keep the files as evidence")
        if n == count and (last is None if n == 0 else (last is not None and last.get("hash") == prev)):
            if key is not None and last is not None and not upgrading and not self._valid(last, key):
                raise AuditError(f"{self.path}: the last entry does not verify under the node's key (edited or "
                                 "written without the key); refusing to write. Run 'fedrad-node audit verify'")
            return prev, count
        if (n == count + 1 and last is not None and last.get("seq") == n and last.get("prev_hash") == prev
                and self._valid(last, key)):
            log.warning("audit log %s: head was one entry behind (interrupted append); rolled forward", self.path)
            self._write_head(str(last["hash"]), n, key)
            return str(last["hash"]), n
        extra = " (or the lines past the head were not written with the node's key)" if key is not None else ""
        raise AuditError(f"{self.path}: log ({n} lines) and head ({count} entries) disagree{extra}; refusing to "
                         "write. Run 'fedrad-node audit verify' before anything more is sent")

    def _tail(self) -> tuple[dict[str, Any] | None, int]:
        """The last line parsed (None if absent or damaged) and the number of lines."""
        if not self.path.exists():
            return None, 0
        lines = self.path.read_bytes().splitlines()
        if not lines:
            return None, 0
        try:
            last = json.loads(lines[-1])
        except ValueError:
            return None, len(lines)
        return (last if isinstance(last, dict) else None), len(lines)

    # ------------------------------------------------------------------ writing
    def append(
        self,
        *,
        study: str,
        round: int,
        kind: str,
        content: RecordDict | None,
        epsilon_before: float | None,
        epsilon_after: float | None,
        policy_version: str,
        outcome: str = "sent",
    ) -> AuditHead:
        """Record one outgoing message (``content`` None for a refusal); return the new head."""
        with locked(self.path):
            key, created = self._load_key(create=True) if self.keyed else (None, False)
            prev, count = self._consistent_head(key, key_created=created)
            if key is not None and count and not created:  # the node writes only onto a log that verifies
                problems = self.verify_report().problems
                if problems:
                    raise AuditError(f"{self.path}: the log does not verify under the node's key ({problems[0]}"
                                     f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}); refusing to "
                                     "write. Run 'fedrad-node audit verify' and keep the files as evidence")
            entry: dict[str, Any] = {
                "seq": count + 1,
                "time": time.time(),
                "study": study,
                "round": int(round),
                "kind": kind,
                "outcome": outcome,
                "arrays": [],
                "metrics": {},
                "epsilon_before": epsilon_before,
                "epsilon_after": epsilon_after,
                "policy_version": policy_version,
                "prev_hash": prev,
            }
            for rec in (content or RecordDict()).values():
                if isinstance(rec, ArrayRecord):
                    for name, arr in sorted(rec.items()):
                        nd = arr.numpy()
                        entry["arrays"].append({
                            "name": name, "shape": list(nd.shape), "dtype": str(nd.dtype), "bytes": int(nd.nbytes),
                            "sha256": hashlib.sha256(np.ascontiguousarray(nd).tobytes()).hexdigest(),
                        })
                elif isinstance(rec, MetricRecord):
                    entry["metrics"] = {k: _json_safe(v) for k, v in sorted(rec.items())}
            entry["bytes_sent"] = sum(a["bytes"] for a in entry["arrays"])
            if key is not None:
                entry["chain"] = KEYED
                entry["hash"] = _mac(key, entry)
            else:
                entry["hash"] = _digest(entry)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._write_head(entry["hash"], count + 1, key)
            os.chmod(self.path, 0o600)
        return AuditHead(str(entry["hash"]), count + 1)

    # ------------------------------------------------------------------ reading
    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                e = None
            # Valid JSON that is not an object (``42``, ``[]``) is as damaged as invalid JSON.
            out.append(e if isinstance(e, dict) else {"seq": None, "_malformed_line": i})
        return out

    def verify(self) -> list[str]:
        """Every problem found, each naming the entry (line) it concerns; empty when intact."""
        return self.verify_report().problems

    def verify_report(self) -> AuditReport:
        """Check the whole log (and its head) under the key if this log has one; never creates the key."""
        key: bytes | None = None
        problems: list[str] = []
        if self.keyed:
            try:
                key, _ = self._load_key(create=False)
            except AuditError as exc:
                return AuditReport(len(self.entries()), True, 0, [f"cannot verify: {exc}"])
        prev, keyed_seen, prefix, unverifiable = GENESIS, False, 0, 0
        entries = self.entries()
        for line, e in enumerate(entries, 1):
            if "_malformed_line" in e:
                problems.append(f"line {line}: not valid JSON (edited or damaged)")
                prev = "?"
                continue
            if e.get("seq") != line:
                problems.append(f"line {line}: sequence number {e.get('seq')} (entries deleted, inserted or reordered)")
            if e.get("prev_hash") != prev:
                problems.append(f"line {line}: does not chain to the entry before it (deleted, inserted or reordered)")
            if e.get("chain") == KEYED:
                keyed_seen = True
                if key is None:
                    unverifiable += 1
                elif not hmac.compare_digest(_mac(key, e), str(e.get("hash"))):
                    problems.append(f"line {line}: content does not match its keyed hash (edited, or written "
                                    "without the node's audit key)")
            else:
                if keyed_seen and key is not None:
                    problems.append(f"line {line}: unkeyed entry after keyed ones (written without the node's "
                                    "audit key)")
                elif _digest(e) != e.get("hash"):
                    problems.append(f"line {line}: content does not match its hash (edited)")
                if not keyed_seen:
                    prefix += 1
            prev = str(e.get("hash"))
        if unverifiable:
            problems.append(f"{unverifiable} entries are keyed ({KEYED}) but no key was given: their content cannot be "
                            "checked (give the node's key: --config node.yaml or --key FILE)")
        try:
            last, count, mac = self._read_head()
        except AuditError as exc:
            problems.append(str(exc))
            return AuditReport(len(entries), key is not None, prefix if keyed_seen else 0, problems)
        if count != len(entries) or (entries and last != entries[-1].get("hash")) or (not entries and count):
            problems.append(f"log has {len(entries)} entries but its head records {count}: entries removed from the end "
                            "or the log replaced")
        if key is not None:
            if (keyed_seen or count) and (mac is None or not hmac.compare_digest(mac, _head_mac(key, last, count))):
                problems.append(f"{self.head_path.name}: head not signed by the node's audit key (replaced or forged)")
            if entries and not keyed_seen:
                problems.append(f"none of the {len(entries)} entries is keyed although the node has an audit key: the "
                                "log was replaced without the key (or the key was created and nothing appended since)")
        return AuditReport(len(entries), key is not None, prefix if keyed_seen else 0, problems)

    def check_receipt(self, receipt: AuditHead) -> list[str]:
        """Problems with a receipt (the head a reply carried, from the coordinator's governance report):
        empty when entry ``receipt.count`` is in the log with exactly that hash."""
        entries = self.entries()
        if receipt.count > len(entries):
            return [f"receipt {receipt.head[:16]}...:{receipt.count}: the log has only {len(entries)} entries "
                    "(truncated or rolled back after the coordinator got this receipt)"]
        e = entries[receipt.count - 1]
        if e.get("hash") != receipt.head:
            return [f"receipt {receipt.head[:16]}...:{receipt.count}: entry {receipt.count} has hash "
                    f"{str(e.get('hash'))[:16]}... (the log was rewritten or rolled back since this receipt)"]
        return []
