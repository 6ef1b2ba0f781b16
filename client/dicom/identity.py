"""Salted hashes of identifiers (patient IDs, UIDs) and content hashes of files.

Nothing that leaves this module identifies a patient: identifiers are only ever kept as
``salted_hash(salt, value)``. The salt is per node (random, stored with mode 0600 in the
cache folder) unless the configuration fixes one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from fedrad.common.errors import DataError

log = logging.getLogger(__name__)

SALT_FILE = "hash-salt"
_CHUNK = 1 << 20


def salted_hash(salt: str, value: str) -> str:
    """A 16-hex-digit salted sha256 of ``value`` (whitespace-stripped); empty stays empty."""
    value = value.strip()
    if not value:
        return ""
    return hashlib.sha256(f"{salt}\x00{value}".encode("utf-8", "surrogateescape")).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def node_salt(cache_dir: Path, configured: str | None = None) -> str:
    """The configured salt, else the node's stored random salt (created on first use)."""
    if configured:
        return configured
    path = cache_dir / SALT_FILE
    try:
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
        cache_dir.mkdir(parents=True, exist_ok=True)
        salt = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(salt)
        log.info("created a new per-node hash salt in %s", cache_dir)
        return salt
    except FileExistsError:  # a concurrent process created it first
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DataError(f"{path}: cannot read or create the hash salt ({exc.strerror})") from None
