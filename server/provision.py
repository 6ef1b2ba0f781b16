"""Provision a federation: its CA, the SuperLink's TLS certificate, and one node kit per hospital.

Each hospital makes its own authentication key pair on its own machine (``fedrad-node keygen``)
and sends the coordinator only the PUBLIC key; no code path here ever creates, reads or stores a
hospital's private key. Layout of the provisioning folder (``--out``)::

    coordinator/ca.key              the federation CA's private key (0600; never leaves the coordinator)
    coordinator/ca.pem              the CA certificate
    coordinator/superlink.key|.pem  the SuperLink's TLS key (0600) and certificate (SANs from the config)
    coordinator/supernodes/NAME.pub each hospital's authentication public key (OpenSSH), to register
    federation-state.json           registry: hospitals, key fingerprints, revocations
    nodes/NAME/                     the node kit handed to hospital NAME (nothing secret in it):
        ca.pem, node.yaml (a template), fedrad-node.sh (the launch script), and node-auth.pub (the
        public key registered for it, once received: ``fedrad-node check`` compares the node's
        private key with it)

A hospital is added with its public key (``add-node NAME --public-key FILE``, or ``public_key:``
beside its name in the federation YAML); one listed without a key gets its kit and waits, unregistered,
until its public key arrives. Re-running adds what is new in the config and re-issues nothing else.
Revoking a hospital removes its public key from ``coordinator/supernodes/`` and records the
revocation, so the coordinator no longer registers (or unregisters) it. Every private key (CA,
SuperLink) is written 0600 through :mod:`fedrad.common.keyfiles`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedrad.common.config import load_yaml_model
from fedrad.common.durable import atomic_write_json
from fedrad.common.errors import FedradError
from fedrad.common.keyfiles import ssh_fingerprint, write_private, write_public

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CA_DAYS = 5 * 365
LEAF_DAYS = 365
#: The node launch script copied into every kit.
LAUNCH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "fedrad-node.sh"


class SuperLinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str = Field(..., description="host name or IP hospitals connect to")
    port: int = Field(8000, ge=1, le=65535, description="the public Fleet port hospitals connect to")
    control_port: int | None = Field(
        None, ge=1, le=65535,
        description="loopback-only port of the SuperLink itself (Control API); default: port + 1")
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @field_validator("ip_addresses")
    @classmethod
    def _ips(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ip in v:
            ipaddress.ip_address(ip)  # raises ValueError naming the bad value
        return v


class HospitalEntry(BaseModel):
    """One hospital: its name and, once received, the file holding its PUBLIC key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    public_key: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"hospital names must be lower-case letters, digits and '-': {v!r}")
        return v


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    superlink: SuperLinkConfig
    hospitals: tuple[HospitalEntry, ...] = Field(..., min_length=1)

    @field_validator("hospitals", mode="before")
    @classmethod
    def _plain_names(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [{"name": h} if isinstance(h, str) else h for h in v]
        return v

    @field_validator("hospitals")
    @classmethod
    def _unique(cls, v: tuple[HospitalEntry, ...]) -> tuple[HospitalEntry, ...]:
        names = [h.name for h in v]
        if len(set(names)) != len(names):
            raise ValueError("hospital names must be unique")
        return v

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hospitals)


def load_federation(path: str | Path) -> FederationConfig:
    """Load federation.yaml; public-key paths are relative to its folder."""
    cfg = load_yaml_model(path, FederationConfig)
    base = Path(path).resolve().parent
    return cfg.model_copy(update={"hospitals": tuple(
        h if h.public_key is None or h.public_key.is_absolute() else h.model_copy(update={"public_key": base / h.public_key})
        for h in cfg.hospitals)})


def read_public_key(path: Path) -> bytes:
    """A hospital's OpenSSH EC public key (``type base64``, comment dropped), or FedradError.

    A private key is refused outright: the coordinator must never receive one.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FedradError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise FedradError(f"{path} holds a PRIVATE key: it must never leave the hospital. Delete this copy, have "
                          "the hospital make a new key pair (`fedrad-node keygen`) and send only node-auth.pub")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError):
        raise FedradError(f"{path} is not an OpenSSH public key (expected node-auth.pub from "
                          "`fedrad-node keygen`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedradError(f"{path}: Flower's node authentication needs an EC key (make one with `fedrad-node keygen`)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def key_fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style fingerprint, the one ``fedrad-node keygen`` prints (to compare by phone)."""
    return ssh_fingerprint(public_openssh)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(cfg: FederationConfig, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
                      ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    sl = cfg.superlink
    # localhost/127.0.0.1 always: the SuperLink's own SuperExec (which starts ServerApps) connects
    # to it on the loopback address and verifies the certificate like any other client.
    dns = list(dict.fromkeys([*sl.dns_names, *([] if _is_ip(sl.address) else [sl.address]), "localhost"]))
    ips = list(dict.fromkeys([*sl.ip_addresses, *([sl.address] if _is_ip(sl.address) else []), "127.0.0.1"]))
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sl.address)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _node_yaml(cfg: FederationConfig, name: str) -> str:
    # The audit key (made by ``fedrad-node keygen`` beside node-auth.key) is named explicitly, so a reader
    # of node.yaml sees where it lives: outside the state folder, with the node's other secrets.
    audit = {"audit": {"key_file": "audit.key"}}
    return yaml.safe_dump({
        "site": name,
        "superlink": f"{cfg.superlink.address}:{cfg.superlink.port}",
        "root_certificates": "ca.pem",
        "auth_private_key": "node-auth.key",
        "auth_public_key": "node-auth.pub",
        "insecure": False,
        "data": {"source": "npz", "path": "/path/to/site-data.npz"},
        "state_dir": "state",
        "privacy": {"epsilon": 20.0, "delta": 1.0e-5},  # the dataset's lifetime budget, over every study
        **audit,  # the audit log's key: outside the state folder, made by `fedrad-node keygen`
    }, sort_keys=False)


class Provisioner:
    """Creates and updates one provisioning folder; every method is idempotent."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.coord = out / "coordinator"
        self.state_path = out / "federation-state.json"

    def _state(self) -> dict[str, Any]:
        if self.state_path.exists():
            state: dict[str, Any] = json.loads(self.state_path.read_text(encoding="utf-8"))
            state.setdefault("pending", {})
            return state
        return {"version": 2, "hospitals": {}, "pending": {}, "revoked": {}}

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, state, mode=0o644)

    def _ca(self, cfg: FederationConfig) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key_p, cert_p = self.coord / "ca.key", self.coord / "ca.pem"
        if key_p.exists() and cert_p.exists():
            key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise FedradError(f"{key_p} is not the EC key fedrad provisions")
            return key, x509.load_pem_x509_certificate(cert_p.read_bytes())
        key, cert = _make_ca(cfg.name)
        write_private(key_p, _pem_key(key))
        write_public(cert_p, cert.public_bytes(serialization.Encoding.PEM))
        log.info("created federation CA for %s", cfg.name)
        return key, cert

    def _superlink_cert(self, cfg: FederationConfig, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> x509.Certificate:
        key, cert = _make_server_cert(cfg, ca_key, ca)
        write_private(self.coord / "superlink.key", _pem_key(key))
        write_public(self.coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def provision(self, cfg: FederationConfig, *, public_keys: dict[str, Path] | None = None) -> list[str]:
        """Create what is missing for ``cfg``; returns the names of hospitals whose kit was issued now.

        ``public_keys`` (name -> public-key file) adds to the keys named in ``cfg``.
        """
        keys = {h.name: h.public_key for h in cfg.hospitals if h.public_key is not None}
        keys.update(public_keys or {})
        unknown = sorted(set(keys) - set(cfg.names))
        if unknown:
            raise FedradError(f"public keys given for hospitals not in the federation config: {', '.join(unknown)}")
        state = self._state()
        ca_key, ca = self._ca(cfg)
        if not (self.coord / "superlink.pem").exists():
            self._superlink_cert(cfg, ca_key, ca)
        state["federation"] = cfg.name
        state["superlink"] = f"{cfg.superlink.address}:{cfg.superlink.port}"
        state["control_port"] = cfg.superlink.control_port or cfg.superlink.port + 1
        issued: list[str] = []
        for name in cfg.names:
            if name in state["revoked"]:
                continue
            if name not in state["hospitals"] and name not in state["pending"]:
                self._write_kit(cfg, name, ca)
                state["pending"][name] = {"issued": _now().isoformat()}
                issued.append(name)
            if name in keys and name in state["pending"]:
                self._accept_key(state, name, read_public_key(keys[name]))
        self._save(state)
        return issued

    def renew_superlink(self, cfg: FederationConfig) -> None:
        """Re-issue the SuperLink's key and certificate (expiry, new names); node kits stay valid."""
        ca_key, ca = self._ca(cfg)
        cert = self._superlink_cert(cfg, ca_key, ca)
        log.warning("re-issued the SuperLink certificate (valid until %s)", cert.not_valid_after_utc.date())

    def _write_kit(self, cfg: FederationConfig, name: str, ca: x509.Certificate) -> None:
        """The kit: CA certificate, node.yaml template and launch script. No key: the hospital makes its own."""
        kit = self.out / "nodes" / name
        write_public(kit / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        write_public(kit / "node.yaml", _node_yaml(cfg, name).encode("utf-8"))
        if LAUNCH_SCRIPT.exists():
            script = kit / "fedrad-node.sh"
            write_public(script, LAUNCH_SCRIPT.read_bytes())
            script.chmod(0o755)
        log.info("issued node kit for %s", name)

    def _accept_key(self, state: dict[str, Any], name: str, public: bytes) -> None:
        digest = hashlib.sha256(public).hexdigest()
        for other, info in [*state["hospitals"].items(), *state["revoked"].items()]:
            if other != name and info.get("public_key_sha256") == digest:
                raise FedradError(f"this public key is already {'revoked for' if other in state['revoked'] else 'registered to'} "
                                  f"{other!r}; every hospital needs its own key pair")
        write_public(self.coord / "supernodes" / f"{name}.pub", public + b"\n")
        write_public(self.out / "nodes" / name / "node-auth.pub", public + b"\n")
        info = state["pending"].pop(name, {})
        state["hospitals"][name] = {**info, "public_key_sha256": digest, "fingerprint": key_fingerprint(public),
                                    "key_received": _now().isoformat()}
        log.info("accepted the public key of %s (%s)", name, key_fingerprint(public))

    def add_node(self, cfg: FederationConfig, name: str, *, public_key: Path | None = None) -> bool:
        """Issue a kit for ``name`` and/or record its public key; False if nothing changed."""
        if not NAME_RE.match(name):
            raise FedradError(f"hospital name {name!r}: use lower-case letters, digits and '-'")
        state = self._state()
        if name in state["revoked"]:
            raise FedradError(f"hospital {name!r} was revoked; provision it under a new name")
        if name in state["hospitals"]:
            if public_key is not None and hashlib.sha256(read_public_key(public_key)).hexdigest() \
                    != state["hospitals"][name]["public_key_sha256"]:
                raise FedradError(f"{name!r} already has a different public key; to replace a lost or leaked key, "
                                  f"revoke {name!r} and add the hospital under a new name")
            return False
        changed = False
        if name not in state["pending"]:
            _, ca = self._ca(cfg)
            self._write_kit(cfg, name, ca)
            state["pending"][name] = {"issued": _now().isoformat()}
            changed = True
        if public_key is not None:
            self._accept_key(state, name, read_public_key(public_key))
            changed = True
        self._save(state)
        return changed

    def revoke(self, name: str, *, reason: str = "") -> None:
        state = self._state()
        if name not in state["hospitals"] and name not in state["pending"]:
            raise FedradError(f"no provisioned hospital named {name!r} in {self.out}")
        info = state["hospitals"].pop(name, None) or state["pending"].pop(name)
        state["revoked"][name] = {**info, "revoked": _now().isoformat(), "reason": reason}
        (self.coord / "supernodes" / f"{name}.pub").unlink(missing_ok=True)
        self._save(state)
        log.warning("revoked hospital %s", name)

    def pending(self) -> list[str]:
        """Hospitals with a kit whose public key has not arrived yet (not registered)."""
        return sorted(self._state()["pending"])

    def authorized_keys(self) -> list[Path]:
        """The public keys the coordinator registers with its SuperLink (revoked ones excluded)."""
        return sorted((self.coord / "supernodes").glob("*.pub"))
