"""Provision a federation: its CA, the SuperLink's TLS certificate, and one node kit per hospital.

Layout of the provisioning folder (``--out``)::

    coordinator/ca.key              the federation CA's private key (0600; never leaves the coordinator)
    coordinator/ca.pem              the CA certificate
    coordinator/superlink.key|.pem  the SuperLink's TLS key (0600) and certificate (SANs from the config)
    coordinator/supernodes/NAME.pub each hospital's authentication public key (OpenSSH), to register
    federation-state.json           registry: hospitals, key fingerprints, revocations
    nodes/NAME/                     the node kit handed to hospital NAME:
        ca.pem, node-auth.key (0600, EC P-384, OpenSSH private-key format), node-auth.pub (OpenSSH), node.yaml (a template)

Re-running adds hospitals that are new in the config and re-issues nothing else. Revoking a
hospital removes its public key from ``coordinator/supernodes/`` and records the revocation, so
the coordinator no longer registers (or unregisters) it. Keys use the formats Flower's SuperNode
authentication expects (EC P-384; private and public key in OpenSSH form), checked
against the ``flower-supernode`` binary.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
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
from fedrad.common.errors import FedradError

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CA_DAYS = 5 * 365
LEAF_DAYS = 365


class SuperLinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str = Field(..., description="host name or IP hospitals connect to")
    port: int = Field(8000, ge=1, le=65535, description="the SuperLink port (Flower 1.41 serves every API on one port)")
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @field_validator("ip_addresses")
    @classmethod
    def _ips(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ip in v:
            ipaddress.ip_address(ip)  # raises ValueError naming the bad value
        return v


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    superlink: SuperLinkConfig
    hospitals: tuple[str, ...] = Field(..., min_length=1)

    @field_validator("hospitals")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in v if not NAME_RE.match(n)]
        if bad:
            raise ValueError(f"hospital names must be lower-case letters, digits and '-': {bad}")
        if len(set(v)) != len(v):
            raise ValueError("hospital names must be unique")
        return v


def load_federation(path: str | Path) -> FederationConfig:
    return load_yaml_model(path, FederationConfig)


def _write_private(path: Path, data: bytes) -> None:
    """Create a private file with mode 0600 from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


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
    }, sort_keys=False)


class Provisioner:
    """Creates and updates one provisioning folder; every method is idempotent."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.coord = out / "coordinator"
        self.state_path = out / "federation-state.json"

    def _state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        return {"version": 1, "hospitals": {}, "revoked": {}}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _ca(self, cfg: FederationConfig) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key_p, cert_p = self.coord / "ca.key", self.coord / "ca.pem"
        if key_p.exists() and cert_p.exists():
            key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return key, x509.load_pem_x509_certificate(cert_p.read_bytes())
        key, cert = _make_ca(cfg.name)
        _write_private(key_p, _pem_key(key))
        _write_public(cert_p, cert.public_bytes(serialization.Encoding.PEM))
        log.info("created federation CA for %s", cfg.name)
        return key, cert

    def provision(self, cfg: FederationConfig) -> list[str]:
        """Create what is missing for ``cfg``; returns the names of hospitals issued now."""
        state = self._state()
        ca_key, ca = self._ca(cfg)
        if not (self.coord / "superlink.pem").exists():
            key, cert = _make_server_cert(cfg, ca_key, ca)
            _write_private(self.coord / "superlink.key", _pem_key(key))
            _write_public(self.coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        state["federation"] = cfg.name
        state["superlink"] = f"{cfg.superlink.address}:{cfg.superlink.port}"
        issued = [n for n in cfg.hospitals if n not in state["hospitals"] and n not in state["revoked"]]
        for name in issued:
            state["hospitals"][name] = self._issue_node(cfg, name, ca)
        self._save(state)
        return issued

    def renew_superlink(self, cfg: FederationConfig) -> None:
        """Re-issue the SuperLink's key and certificate (expiry, new names); node kits stay valid."""
        ca_key, ca = self._ca(cfg)
        key, cert = _make_server_cert(cfg, ca_key, ca)
        _write_private(self.coord / "superlink.key", _pem_key(key))
        _write_public(self.coord / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM))
        log.warning("re-issued the SuperLink certificate (valid until %s)", cert.not_valid_after_utc.date())

    def _issue_node(self, cfg: FederationConfig, name: str, ca: x509.Certificate) -> dict[str, Any]:
        kit = self.out / "nodes" / name
        key = ec.generate_private_key(ec.SECP384R1())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        # Flower's SuperNode reads its key with load_ssh_private_key: OpenSSH private-key format.
        ssh_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        _write_private(kit / "node-auth.key", ssh_key)
        _write_public(kit / "node-auth.pub", pub + b"\n")
        _write_public(kit / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        (kit / "node.yaml").write_text(_node_yaml(cfg, name), encoding="utf-8")
        _write_public(self.coord / "supernodes" / f"{name}.pub", pub + b"\n")
        log.info("issued node kit for %s", name)
        return {"public_key_sha256": hashlib.sha256(pub).hexdigest(), "issued": _now().isoformat()}

    def add_node(self, cfg: FederationConfig, name: str) -> bool:
        if not NAME_RE.match(name):
            raise FedradError(f"hospital name {name!r}: use lower-case letters, digits and '-'")
        state = self._state()
        if name in state["revoked"]:
            raise FedradError(f"hospital {name!r} was revoked; provision it under a new name")
        if name in state["hospitals"]:
            return False
        self._ca(cfg)
        state["hospitals"][name] = self._issue_node(cfg, name, self._ca(cfg)[1])
        self._save(state)
        return True

    def revoke(self, name: str, *, reason: str = "") -> None:
        state = self._state()
        if name not in state["hospitals"]:
            raise FedradError(f"no provisioned hospital named {name!r} in {self.out}")
        info = state["hospitals"].pop(name)
        state["revoked"][name] = {**info, "revoked": _now().isoformat(), "reason": reason}
        (self.coord / "supernodes" / f"{name}.pub").unlink(missing_ok=True)
        self._save(state)
        log.warning("revoked hospital %s", name)

    def authorized_keys(self) -> list[Path]:
        """The public keys the coordinator registers with its SuperLink (revoked ones excluded)."""
        return sorted((self.coord / "supernodes").glob("*.pub"))
