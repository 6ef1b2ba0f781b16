"""The node's audit trail: an append-only, hash-chained record of every message it sends.

One JSON object per line. Each entry holds what was sent (array names, shapes, dtypes, byte
count and sha256; metric names and values), the study and round, epsilon before and after, the
node policy's version, the previous entry's hash and its own hash (sha256 of its canonical JSON
without the hash). A sidecar head file holds the last hash and the entry count, written
atomically, so truncating the log is detected too. :meth:`AuditLog.verify` finds any edited,
deleted, inserted, reordered or truncated entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedrad.common.durable import atomic_write_json, locked
from fedrad.common.errors import AuditError

GENESIS = "0" * 64
log = logging.getLogger(__name__)


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    def _head(self) -> tuple[str, int]:
        if not self.head_path.exists():
            return GENESIS, 0
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            return str(head["last_hash"]), int(head["count"])
        except (OSError, ValueError, KeyError) as exc:
            raise AuditError(f"{self.head_path}: unreadable audit head ({exc})") from None

    def _write_head(self, last_hash: str, count: int) -> None:
        atomic_write_json(self.head_path, {"last_hash": last_hash, "count": count})

    def _consistent_head(self) -> tuple[str, int]:
        """The head to chain onto, after checking it against the log's last line (lock held).

        A crash between writing a line and replacing the head leaves exactly one valid entry past
        the head: the head is rolled forward. Any other disagreement means the log was damaged or
        tampered with: refuse to write (nothing is sent unaudited) rather than fork the chain.
        """
        prev, count = self._head()
        last, n = self._tail()
        if n == count and (last is None or last.get("hash") == prev):
            return prev, count
        if (n == count + 1 and last is not None and last.get("seq") == n and last.get("prev_hash") == prev
                and _digest(last) == last.get("hash")):
            log.warning("audit log %s: head was one entry behind (interrupted append); rolled forward", self.path)
            self._write_head(str(last["hash"]), n)
            return str(last["hash"]), n
        raise AuditError(f"{self.path}: log ({n} lines) and head ({count} entries) disagree; "
                         "run 'fedrad-node audit verify' before anything more is sent")

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
    ) -> dict[str, Any]:
        """Record one outgoing message (``content`` None for a refusal) and return the entry."""
        with locked(self.path):
            prev, count = self._consistent_head()
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
            entry["hash"] = _digest(entry)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._write_head(entry["hash"], count + 1)
            os.chmod(self.path, 0o600)
        return entry

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
        problems: list[str] = []
        prev = GENESIS
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
            if _digest(e) != e.get("hash"):
                problems.append(f"line {line}: content does not match its hash (edited)")
            prev = str(e.get("hash"))
        last, count = self._head()
        if count != len(entries) or (entries and last != entries[-1].get("hash")) or (not entries and count):
            problems.append(f"log has {len(entries)} entries but its head records {count}: entries removed from the end "
                            "or the log replaced")
        return problems
