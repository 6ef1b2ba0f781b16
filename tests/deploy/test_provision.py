"""Provisioning: CA, SuperLink certificate, node kits; idempotent; revocation; key formats Flower loads."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.common.errors import ConfigError, FedradError
from fedrad.server.cli import main as fedrad_main
from fedrad.server.provision import Provisioner, load_federation

FED = """name: demo
superlink: {address: 127.0.0.1, port: 8000, dns_names: [coordinator.hospital-net.local]}
hospitals: [hospital-a, hospital-b]
"""


@pytest.fixture()
def provisioned(tmp_path: Path) -> tuple[Path, Path]:
    cfg = tmp_path / "federation.yaml"
    cfg.write_text(FED)
    out = tmp_path / "prov"
    assert fedrad_main(["provision", "--config", str(cfg), "--out", str(out)]) == 0
    return cfg, out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_keys_are_0600_and_ca_key_never_in_a_kit(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    keys = list(out.rglob("*.key"))
    assert {k.name for k in keys} == {"ca.key", "superlink.key", "node-auth.key"}
    assert all(_mode(k) == 0o600 for k in keys)
    ca_key = (out / "coordinator" / "ca.key").read_bytes()
    for kit in (out / "nodes").iterdir():
        assert not (kit / "ca.key").exists()
        assert all(f.read_bytes() != ca_key for f in kit.iterdir())


def test_superlink_certificate_has_sans_and_verifies_against_ca(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    ca = x509.load_pem_x509_certificate((out / "coordinator" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "coordinator" / "superlink.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.hospital-net.local" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number != ca.serial_number


def test_node_keys_are_in_the_formats_flower_loads(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    kit = out / "nodes" / "hospital-a"
    # flower-supernode loads --auth-supernode-private-key with load_ssh_private_key
    priv = serialization.load_ssh_private_key((kit / "node-auth.key").read_bytes(), password=None)
    pub = serialization.load_ssh_public_key((kit / "node-auth.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
    assert (out / "coordinator" / "supernodes" / "hospital-a.pub").read_bytes() == (kit / "node-auth.pub").read_bytes()
    assert (kit / "ca.pem").read_bytes() == (out / "coordinator" / "ca.pem").read_bytes()


def test_rerun_adds_new_hospitals_without_reissuing(provisioned: tuple[Path, Path]) -> None:
    cfg, out = provisioned
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".key", ".pem", ".pub")}
    cfg.write_text(FED.replace("[hospital-a, hospital-b]", "[hospital-a, hospital-b, hospital-c]"))

    assert Provisioner(out).provision(load_federation(cfg)) == ["hospital-c"]

    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was re-issued"
    assert (out / "nodes" / "hospital-c" / "node-auth.key").exists()


def test_revoked_node_is_no_longer_authorised_and_cannot_be_reissued(provisioned: tuple[Path, Path]) -> None:
    cfg, out = provisioned
    prov = Provisioner(out)

    prov.revoke("hospital-b", reason="laptop stolen")

    assert [p.name for p in prov.authorized_keys()] == ["hospital-a.pub"]
    assert prov.provision(load_federation(cfg)) == []  # re-running does not bring it back
    with pytest.raises(FedradError, match="revoked"):
        prov.add_node(load_federation(cfg), "hospital-b")
    with pytest.raises(FedradError, match="no provisioned hospital"):
        prov.revoke("hospital-z")


def test_bad_federation_config_names_file_field_and_value(tmp_path: Path) -> None:
    cfg = tmp_path / "federation.yaml"
    cfg.write_text("name: x\nsuperlink: {address: h, ip_addresses: [not-an-ip], colour: red}\nhospitals: [Bad Name]\n")
    with pytest.raises(ConfigError) as err:
        load_federation(cfg)
    text = "\n".join(err.value.problems)
    assert str(cfg) in text and "superlink.ip_addresses" in text and "not-an-ip" in text
    assert "superlink.colour" in text and "hospitals" in text
    assert fedrad_main(["provision", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
