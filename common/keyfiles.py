"""Key and certificate files written safely: private keys are 0600 from their first byte.

Every file goes through a fresh temporary name in the target's own folder, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a file or symlink planted at a predictable name can neither
lend its permissions nor redirect the write), is fsynced, and is renamed over the target; the
folder is fsynced after. A target that is a symlink is refused rather than replaced or followed.
Used by provisioning on the coordinator (CA and SuperLink keys) and by ``fedrad-node keygen``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path

from .durable import fsync_dir, write_all
from .errors import FedradError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _refuse_symlink(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise FedradError(f"{path} is a symbolic link; refusing to write a key through it "
                          "(remove the link and run the command again)")
    if not stat.S_ISREG(st.st_mode):
        raise FedradError(f"{path} exists and is not a regular file; refusing to replace it")


def write_file(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Atomically create or replace ``path`` with ``data`` and permissions ``mode``.

    ``exclusive``: fail (FedradError) if ``path`` already exists, never replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_symlink(path)
    if exclusive and os.path.lexists(path):
        raise FedradError(f"{path} already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits; never adds any beyond ``mode``
            write_all(fd, data)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # fails if the target appeared meanwhile: never clobbers
            os.unlink(tmp)
        else:
            _refuse_symlink(path)
            os.replace(tmp, path)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise FedradError(f"{path} already exists; refusing to overwrite it") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def ssh_fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style fingerprint of an OpenSSH public key line (``SHA256:`` + unpadded base64), as
    ``ssh-keygen -l`` prints it: what hospital and coordinator compare by phone."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise FedradError("not an OpenSSH public key")
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(parts[1])).digest()).decode().rstrip("=")


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """A private key (mode 0600, never readable by others, not even briefly)."""
    write_file(path, data, mode=PRIVATE_MODE, exclusive=exclusive)


def write_public(path: Path, data: bytes) -> None:
    """A certificate, public key or kit file (mode 0644)."""
    write_file(path, data, mode=PUBLIC_MODE)
