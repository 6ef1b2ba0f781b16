"""The node's audit trail: an append-only, chained record of every message it sends.

One JSON object per line. Each entry holds what was sent (array names, shapes, dtypes, byte
count and sha256; metric names and values), the study and round, epsilon before and after, the
node policy's version, the previous entry's hash and its own hash. A sidecar head file holds the
last hash and the entry count, written atomically, so truncating the log is detected too.

**Keyed** (``key_file`` given; every deployed node): each entry's hash is an HMAC-SHA256, keyed by
the node's audit key (:mod:`fedrad.client.governance.audit_key`, kept outside the state folder), of its
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

**Files**: the log, its head and its lock are never opened through a symlink (``O_NOFOLLOW``) and
only as regular files of the node's user (checked on the open descriptor, mode set with
``fchmod``): whoever can write the state folder cannot plant ``audit.jsonl -> ~/.bash_aliases`` and
have the next append write a coordinator-chosen study id into it. Every entry is one line of ASCII
JSON (control and non-ASCII characters escaped); coordinator-chosen text is cut to
:data:`MAX_TEXT` characters. Reading tolerates any bytes: a line that is not valid UTF-8, not
JSON, nested too deep or not an object is reported by :meth:`AuditLog.verify`, never a crash.

**Unkeyed** (no key file: simulation and tests): the hash is a plain sha256, which detects damage
and careless edits but not a rewrite (anyone can recompute it); :meth:`AuditLog.verify` says so.

Upgrading a node with an unkeyed log: the append that creates the key chains its first keyed
entry onto the unkeyed ones (that entry's HMAC covers their last hash, so from then on they cannot
be changed undetected either); once the key exists an unkeyed last line is never adopted.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedrad.client.governance.audit_key import load_key
from fedrad.common.durable import atomic_write_json, locked, write_all
from fedrad.common.errors import AuditError

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


#: Longest coordinator-chosen text (study id, refusal reason) recorded in an entry.
MAX_TEXT = 1024
#: Largest audit file (log or head) read back (a larger one is reported, never loaded whole).
MAX_READ_BYTES = 1 << 30
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # never follow a link, never block on a FIFO
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _text(value: Any) -> str:
    """Coordinator-chosen text as recorded: a str, cut to :data:`MAX_TEXT` characters (JSON escapes the
    rest: every control character and non-ASCII character is written as an escape, so an entry is
    always exactly one line of plain ASCII JSON)."""
    return str(value)[:MAX_TEXT]


def _checked_fd(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise AuditError(f"{path}: not a regular file: refused (replaced by something else?)")
    if st.st_uid != os.getuid():
        raise AuditError(f"{path}: belongs to uid {st.st_uid}, not to this node's user: refused")
    return st


def _open_error(path: Path, exc: OSError) -> AuditError:
    if exc.errno == errno.ELOOP or path.is_symlink():
        return AuditError(f"{path}: is a symlink: refused (the audit files are never opened through a link)")
    return AuditError(f"{path}: cannot be opened ({exc.strerror})")


def read_private(path: Path) -> bytes | None:
    """The bytes of one of the node's audit files, None if absent. :class:`AuditError` if it is a
    symlink, not a regular file, not this user's, or larger than :data:`MAX_READ_BYTES`."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        st = _checked_fd(fd, path)
        if st.st_size > MAX_READ_BYTES:
            raise AuditError(f"{path}: {st.st_size} bytes, larger than {MAX_READ_BYTES}: refused")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """One log line as a JSON object, or None (invalid UTF-8, invalid JSON, nested too deep, not an object)."""
    try:
        e = json.loads(line.decode("utf-8"))
        if not isinstance(e, dict):
            return None
        _canonical(e)  # what verify hashes must be hashable too (nesting just under the parser's limit)
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return e


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
        raw = read_private(self.head_path)
        if raw is None:
            return GENESIS, 0, None
        try:
            head = json.loads(raw.decode("utf-8"))
            mac = head.get("mac")
            return str(head["last_hash"]), int(head["count"]), (None if mac is None else str(mac))
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError, OverflowError) as exc:
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
        raw = read_private(self.path)
        lines = [] if raw is None else raw.splitlines()
        if not lines:
            return None, 0
        return _parse_line(lines[-1]), len(lines)

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
                "study": _text(study),
                "round": int(round),
                "kind": _text(kind),
                "outcome": _text(outcome),
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
            self._append_line((json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii"))
            self._write_head(entry["hash"], count + 1, key)
        return AuditHead(str(entry["hash"]), count + 1)

    def _append_line(self, line: bytes) -> None:
        """Append one line to the log: never through a symlink (``O_NOFOLLOW``), only to a regular file
        this user owns, made 0600 through the open descriptor."""
        try:
            fd = os.open(self.path, _APPEND_FLAGS, 0o600)
        except OSError as exc:
            raise _open_error(self.path, exc) from None
        try:
            _checked_fd(fd, self.path)
            os.fchmod(fd, 0o600)
            write_all(fd, line)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading
    def entries(self) -> list[dict[str, Any]]:
        """Every line parsed (a line that is not a JSON object: ``{"seq": None, "_malformed_line": N}``).
        :class:`AuditError` if the log is a symlink or not a regular file of this user."""
        raw = read_private(self.path)
        if raw is None:
            return []
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            e = _parse_line(line)
            # Valid JSON that is not an object (``42``, ``[]``) is as damaged as invalid JSON.
            out.append(e if e is not None else {"seq": None, "_malformed_line": i})
        return out

    def verify(self) -> list[str]:
        """Every problem found, each naming the entry (line) it concerns; empty when intact."""
        return self.verify_report().problems

    def verify_report(self) -> AuditReport:
        """Check the whole log (and its head) under the key if this log has one; never creates the key."""
        key: bytes | None = None
        problems: list[str] = []
        try:
            entries = self.entries()
        except AuditError as exc:
            return AuditReport(0, self.keyed, 0, [f"cannot verify: {exc}"])
        if self.keyed:
            try:
                key, _ = self._load_key(create=False)
            except AuditError as exc:
                return AuditReport(len(entries), True, 0, [f"cannot verify: {exc}"])
        prev, keyed_seen, prefix, unverifiable = GENESIS, False, 0, 0
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
        try:
            entries = self.entries()
        except AuditError as exc:
            return [f"receipt {receipt.head[:16]}...:{receipt.count}: cannot read the log ({exc})"]
        if receipt.count > len(entries):
            return [f"receipt {receipt.head[:16]}...:{receipt.count}: the log has only {len(entries)} entries "
                    "(truncated or rolled back after the coordinator got this receipt)"]
        e = entries[receipt.count - 1]
        if e.get("hash") != receipt.head:
            return [f"receipt {receipt.head[:16]}...:{receipt.count}: entry {receipt.count} has hash "
                    f"{str(e.get('hash'))[:16]}... (the log was rewritten or rolled back since this receipt)"]
        return []
