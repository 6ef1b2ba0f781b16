"""Durable files on a node or coordinator: atomic JSON writes and an exclusive file lock.

Used wherever a crash must never leave a half-written file (privacy ledger, app allow-list,
audit head, metrics): write a temporary file in the same folder, fsync it, rename it over the
old one, fsync the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, *, mode: int | None = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically (readers see the old or the new file, never a mix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, data: Any, *, mode: int | None = 0o600, **dump: Any) -> None:
    """:func:`atomic_write_text` of ``json.dumps(data, indent=1, sort_keys=True, **dump)``."""
    atomic_write_text(path, json.dumps(data, **{"indent": 1, "sort_keys": True, **dump}), mode=mode)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` + ``.lock`` (serialises writers across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
