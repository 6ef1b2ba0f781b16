"""Durable files on a node or coordinator: atomic JSON writes and an exclusive file lock.

Used wherever a crash must never leave a half-written file (privacy ledger, app allow-list,
audit head, metrics): write a temporary file in the same folder, fsync it, rename it over the
old one, fsync the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrad.common.errors import FedradError


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` and fsync it (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a file created or renamed in it survives a crash."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str, *, mode: int | None = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically (readers see the old or the new file, never a mix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # through the descriptor: never a path someone could swap
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, *, mode: int | None = 0o600, **dump: Any) -> None:
    """:func:`atomic_write_text` of ``json.dumps(data, indent=1, sort_keys=True, **dump)``."""
    atomic_write_text(path, json.dumps(data, **{"indent": 1, "sort_keys": True, **dump}), mode=mode)


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafeFileError(FedradError, OSError):
    """A file fedrad writes is a symlink, not a regular file, or not this user's: refused (an
    :class:`OSError` too, so callers that handle unusable files handle it)."""

    def __init__(self, code: int, message: str, path: str) -> None:
        OSError.__init__(self, code, f"{path}: {message}", path)

    def __str__(self) -> str:
        return str(self.strerror)


def open_lock(path: Path) -> int:
    """Open (creating 0600 if missing) the lock file ``path``: never through a symlink, only a
    regular file this user owns. Returns the descriptor; :class:`UnsafeFileError` otherwise."""
    try:
        fd = os.open(path, _LOCK_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(errno.ELOOP, "lock file is a symlink: refused", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise UnsafeFileError(errno.EPERM, "lock file is not a regular file of this user: refused", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` + ``.lock`` (serialises writers across processes); the lock
    file is opened with :func:`open_lock` (no symlinks, regular file of this user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock(path.with_name(path.name + ".lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
