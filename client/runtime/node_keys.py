"""The hospital's own authentication key pair: made on the node, only the public half ever leaves.

Flower's SuperNode authenticates to the SuperLink with an EC key: ``flower-supernode
--auth-supernode-private-key`` reads it with ``load_ssh_private_key`` (OpenSSH private-key
format) and the coordinator registers the matching OpenSSH public key (``flwr supernode
register``). ``fedrad-node keygen`` writes both here, the private key 0600 through
:mod:`fedrad.common.keyfiles`; the coordinator receives ``node-auth.pub`` only.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.common.keyfiles import ssh_fingerprint, write_private, write_public

PRIVATE_NAME = "node-auth.key"
PUBLIC_NAME = "node-auth.pub"


def fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style fingerprint of a public key line (see :func:`fedrad.common.keyfiles.ssh_fingerprint`)."""
    return ssh_fingerprint(public_openssh)


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    public_openssh: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_openssh)


def generate(out: Path, *, comment: str = "") -> KeyPair:
    """Create ``out/node-auth.key`` (0600, never overwritten) and ``out/node-auth.pub``."""
    out = Path(out)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode("ascii", "replace")
    write_private(priv_path, private, exclusive=True)  # refuses to replace a key in use
    write_public(pub_path, public + b"\n")
    return KeyPair(priv_path, pub_path, public)


def _public_blob(openssh: bytes) -> bytes:
    return b" ".join(openssh.split()[:2])


def check_private_key(key: Path | None, *, expected_public: Path | None) -> list[tuple[str, str]]:
    """(problem, fix) pairs for the node's private key: present, 0600, parses as the EC key
    Flower loads, and matches ``expected_public`` (the public key registered for this node)."""
    if key is None or not key.exists():
        return [(f"node authentication key {key} missing",
                 "generate it on this machine with `fedrad-node keygen --out DIR` and set auth_private_key; "
                 f"send only DIR/{PUBLIC_NAME} to the coordinator")]
    problems: list[tuple[str, str]] = []
    if key.is_symlink():
        problems.append((f"{key} is a symbolic link", "keep the key as a regular file owned by the node's user"))
    if stat.S_IMODE(key.stat().st_mode) & 0o077:
        problems.append((f"{key} is readable by other users", f"chmod 600 {key}"))
    try:
        priv = serialization.load_ssh_private_key(key.read_bytes(), password=None)  # as flower-supernode reads it
    except (ValueError, TypeError):
        return [*problems, (f"{key} is not an unencrypted OpenSSH private key",
                            "generate one with `fedrad-node keygen --out DIR`")]
    if not isinstance(priv, ec.EllipticCurvePrivateKey):
        return [*problems, (f"{key} is not an EC key (Flower's node authentication needs one)",
                            "generate one with `fedrad-node keygen --out DIR`")]
    mine = priv.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if expected_public is not None:
        if not expected_public.exists():
            problems.append((f"public key {expected_public} missing",
                             f"set auth_public_key to the {PUBLIC_NAME} written by `fedrad-node keygen`"))
        elif _public_blob(expected_public.read_bytes()) != _public_blob(mine):
            problems.append((f"{key} does not match the public key {expected_public}",
                             f"send this node's public key (fingerprint {fingerprint(mine)}) to the coordinator "
                             "and use the private key it was made with"))
    return problems


def public_of(key: Path) -> bytes:
    priv = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    return priv.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
