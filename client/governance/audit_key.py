"""The node's audit key: 32 random bytes that key the audit log's HMAC chain.

The key lives outside the node's state folder (default ``audit.key`` beside ``node.yaml``;
``audit.key_file`` in node.yaml), so whoever can write the state folder (where the log is) cannot
rewrite the log undetected. The file is created on first use with ``O_CREAT|O_EXCL|O_NOFOLLOW``
and mode 0600 and is refused if it is a symlink, not a regular file, not the node user's, readable
or writable by group or others, or shorter than :data:`KEY_BYTES`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any

from fedrad.common.durable import fsync_dir, write_all
from fedrad.common.errors import AuditError, ConfigError

log = logging.getLogger(__name__)

KEY_BYTES = 32
#: Default key file name, beside node.yaml.
DEFAULT_KEY_NAME = "audit.key"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # never block on a FIFO
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def node_audit_key(*, node: Any, node_yaml: str | Path) -> Path:
    """The node's key file: node.yaml ``audit.key_file`` (resolved by the config loader), else
    ``audit.key`` beside node.yaml. :class:`ConfigError` if it lies inside the node's state folder."""
    configured = getattr(getattr(node, "audit", None), "key_file", None)
    yaml_path = Path(node_yaml).resolve()
    key = Path(configured) if configured is not None else yaml_path.parent / DEFAULT_KEY_NAME
    if not key.is_absolute():
        key = yaml_path.parent / key
    state = Path(node.state_dir).resolve()
    resolved = key.parent.resolve() / key.name
    if resolved == state or state in resolved.parents:
        raise ConfigError(str(yaml_path), [f"{yaml_path}: audit.key_file: {key} is inside the state folder {state}; "
                                           "the audit key must live where the state folder's writers cannot reach"])
    return resolved


def load_key(path: str | Path, *, create: bool) -> tuple[bytes, bool]:
    """The key's bytes, and whether this call created the file. :class:`AuditError` on any misuse."""
    p = Path(path)
    try:
        fd = os.open(p, _READ_FLAGS)
    except FileNotFoundError:
        if not create:
            raise AuditError(f"{p}: audit key file missing") from None
        return _create(p), True
    except OSError as exc:
        raise AuditError(_refusal(p, exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"{p}: audit key is not a regular file: refused")
        if st.st_mode & 0o077:
            raise AuditError(f"{p}: audit key is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"refused: make it 0600 (chmod 600 {p}) and consider the key exposed")
        if st.st_uid != os.getuid():
            raise AuditError(f"{p}: audit key belongs to uid {st.st_uid}, not to this node's user: refused")
        key = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(key) < KEY_BYTES:
        raise AuditError(f"{p}: audit key is {len(key)} bytes, fewer than {KEY_BYTES}: refused")
    return key, False


def _create(p: Path) -> bytes:
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(p, _CREATE_FLAGS, 0o600)
    except FileExistsError:  # someone created it between our open and ours: read theirs (checked)
        return load_key(p, create=False)[0]
    except OSError as exc:
        raise AuditError(_refusal(p, exc)) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        write_all(fd, key)
    finally:
        os.close(fd)
    fsync_dir(p.parent)
    log.info("created the node's audit key %s (keep it; the audit log cannot be verified without it)", p)
    return key


def _refusal(p: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP or p.is_symlink():
        return f"{p}: audit key is a symlink: refused"
    return f"{p}: audit key unusable ({exc.strerror})"
