"""Provisioning: CA, SuperLink certificate, node kits without secrets, hospitals' public keys only;
idempotent; revocation; key formats Flower loads; private-key files that cannot be weakened or redirected."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.client.cli import main as node_main
from fedrad.client.commands.node import preflight
from fedrad.client.runtime.node_keys import fingerprint
from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.keyfiles import write_private
from fedrad.server.cli import main as fedrad_main
from fedrad.server.provision import Provisioner, load_federation

from .conftest import hospital_keygen, install_hospital_key

FED = """name: demo
superlink: {address: 127.0.0.1, port: 8000, dns_names: [coordinator.hospital-net.local]}
hospitals: [hospital-a, {name: hospital-b, public_key: keys/hospital-b.pub}]
"""


@pytest.fixture()
def provisioned(tmp_path: Path) -> tuple[Path, Path]:
    """hospital-b's public key is named in the YAML; hospital-a's arrives later through add-node."""
    cfg = tmp_path / "federation.yaml"
    cfg.write_text(FED)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "hospital-b.pub").write_bytes(hospital_keygen(tmp_path / "b-side", "hospital-b").read_bytes())
    out = tmp_path / "prov"
    assert fedrad_main(["provision", "--config", str(cfg), "--out", str(out)]) == 0
    return cfg, out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_coordinator_holds_no_hospital_private_key_and_kits_hold_no_secret(provisioned: tuple[Path, Path]) -> None:
    _, out = provisioned
    keys = list(out.rglob("*.key"))
    assert {k.name for k in keys} == {"ca.key", "superlink.key"}
    assert all(_mode(k) == 0o600 for k in keys)
    for f in out.rglob("*"):
        if f.is_file():
            assert b"PRIVATE KEY" not in f.read_bytes() or f.parent.name == "coordinator", f
    for kit in (out / "nodes").iterdir():
        assert {p.name for p in kit.iterdir()} <= {"ca.pem", "node.yaml", "fedrad-node.sh", "node-auth.pub"}
    assert os.access(out / "nodes" / "hospital-a" / "fedrad-node.sh", os.X_OK)


def test_public_key_from_yaml_is_registered_and_add_node_takes_a_later_one(provisioned: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    cfg, out = provisioned
    prov = Provisioner(out)
    assert [p.name for p in prov.authorized_keys()] == ["hospital-b.pub"] and prov.pending() == ["hospital-a"]
    b_pub = (tmp_path / "b-side" / "hospital-keys" / "hospital-b" / "node-auth.pub").read_bytes()
    registered = (out / "coordinator" / "supernodes" / "hospital-b.pub").read_bytes()
    assert registered.split()[:2] == b_pub.split()[:2]
    assert (out / "nodes" / "hospital-b" / "node-auth.pub").read_bytes() == registered

    a_pub = hospital_keygen(tmp_path / "a-side", "hospital-a")
    assert fedrad_main(["provision", "--config", str(cfg), "--out", str(out), "add-node", "hospital-a",
                        "--public-key", str(a_pub)]) == 0

    assert [p.name for p in prov.authorized_keys()] == ["hospital-a.pub", "hospital-b.pub"] and prov.pending() == []
    # flower-supernode registers OpenSSH EC public keys
    loaded = serialization.load_ssh_public_key((out / "coordinator" / "supernodes" / "hospital-a.pub").read_bytes())
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    # the same key cannot be given to a second hospital; a different key cannot silently replace one
    with pytest.raises(FedradError, match="already registered to 'hospital-a'"):
        prov.add_node(load_federation(cfg), "hospital-c", public_key=a_pub)
    with pytest.raises(FedradError, match="different public key"):
        prov.add_node(load_federation(cfg), "hospital-a", public_key=hospital_keygen(tmp_path / "x", "hospital-a"))


def test_a_private_key_sent_to_the_coordinator_is_refused(provisioned: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg, out = provisioned
    hospital_keygen(tmp_path / "a-side", "hospital-a")
    private = tmp_path / "a-side" / "hospital-keys" / "hospital-a" / "node-auth.key"

    rc = fedrad_main(["provision", "--config", str(cfg), "--out", str(out), "add-node", "hospital-a",
                      "--public-key", str(private)])

    assert rc == FedradError.exit_code and "PRIVATE key" in capsys.readouterr().err
    assert Provisioner(out).pending() == ["hospital-a"]
    assert not any(b"PRIVATE KEY" in f.read_bytes() for f in (out / "nodes").rglob("*") if f.is_file())


def test_keygen_makes_a_0600_key_flower_loads_and_never_overwrites_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert node_main(["keygen", "--out", str(tmp_path / "k")]) == 0
    printed = capsys.readouterr().out
    priv_p, pub_p = tmp_path / "k" / "node-auth.key", tmp_path / "k" / "node-auth.pub"
    assert _mode(priv_p) == 0o600
    priv = serialization.load_ssh_private_key(priv_p.read_bytes(), password=None)  # how flower-supernode reads it
    pub = serialization.load_ssh_public_key(pub_p.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
    assert fingerprint(pub_p.read_bytes()) in printed and pub_p.read_text().split()[1] in printed
    before = priv_p.read_bytes()
    assert node_main(["keygen", "--out", str(tmp_path / "k")]) == FedradError.exit_code
    assert priv_p.read_bytes() == before


def test_check_verifies_the_nodes_key_against_the_registered_public_key(provisioned: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    _, out = provisioned
    kit = out / "nodes" / "hospital-b"
    problems = dict(preflight(kit / "node.yaml", probe=False))
    assert any("missing" in p and "node-auth.key" in p for p in problems)
    assert any("fedrad-node keygen" in fix for fix in problems.values())
    # a key that is not the one the coordinator registered
    hospital_keygen(tmp_path / "wrong", "hospital-b")
    install_hospital_key(tmp_path / "wrong", kit, "hospital-b")
    assert any("does not match" in p for p, _ in preflight(kit / "node.yaml", probe=False))
    # the hospital's own key: no key problem left
    (kit / "node-auth.key").unlink()
    install_hospital_key(tmp_path / "b-side", kit, "hospital-b")
    assert not any("node-auth" in p for p, _ in preflight(kit / "node.yaml", probe=False))
    (kit / "node-auth.key").chmod(0o640)
    assert any(fix == f"chmod 600 {kit / 'node-auth.key'}" for _, fix in preflight(kit / "node.yaml", probe=False))


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
    assert (out / "nodes" / "hospital-a" / "ca.pem").read_bytes() == (out / "coordinator" / "ca.pem").read_bytes()


def test_rerun_adds_new_hospitals_without_reissuing(provisioned: tuple[Path, Path]) -> None:
    cfg, out = provisioned
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".key", ".pem", ".pub")}
    cfg.write_text(FED.replace("public_key: keys/hospital-b.pub}]", "public_key: keys/hospital-b.pub}, hospital-c]"))

    assert Provisioner(out).provision(load_federation(cfg)) == ["hospital-c"]

    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was re-issued"
    assert (out / "nodes" / "hospital-c" / "node.yaml").exists()


def test_revoked_node_is_no_longer_authorised_and_cannot_be_reissued(provisioned: tuple[Path, Path]) -> None:
    cfg, out = provisioned
    prov = Provisioner(out)

    prov.revoke("hospital-b", reason="laptop stolen")

    assert prov.authorized_keys() == []
    assert prov.provision(load_federation(cfg)) == []  # re-running does not bring it back
    assert prov.authorized_keys() == []
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
    assert "superlink.colour" in text and "hospitals" in text and "Bad Name" in text
    assert fedrad_main(["provision", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2


# -- private-key files --------------------------------------------------------------------------
def test_a_planted_temp_file_cannot_loosen_a_private_key(tmp_path: Path) -> None:
    target = tmp_path / "ca.key"
    for name in ("ca.key.tmp", ".ca.key.tmp"):  # the old fixed names, pre-created world-readable
        (tmp_path / name).write_text("planted")
        (tmp_path / name).chmod(0o666)
    os.umask(old := os.umask(0))  # a permissive umask must not matter either
    try:
        write_private(target, b"secret")
    finally:
        os.umask(old)
    assert _mode(target) == 0o600 and target.read_bytes() == b"secret"
    assert (tmp_path / "ca.key.tmp").read_text() == "planted"  # left alone, not written through


def test_a_symlinked_target_or_temp_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    link = tmp_path / "superlink.key"
    link.symlink_to(victim)
    with pytest.raises(FedradError, match="symbolic link"):
        write_private(link, b"secret")
    assert victim.read_text() == "untouched" and link.is_symlink()
    # a symlink planted at the old temp name is not followed either
    (tmp_path / "node-auth.key.tmp").symlink_to(victim)
    write_private(tmp_path / "node-auth.key", b"secret")
    assert victim.read_text() == "untouched" and _mode(tmp_path / "node-auth.key") == 0o600


def test_provisioning_through_a_symlinked_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "federation.yaml"
    cfg.write_text("name: x\nsuperlink: {address: 127.0.0.1}\nhospitals: [a]\n")
    (tmp_path / "prov" / "coordinator").mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "prov" / "coordinator" / "superlink.key").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "prov" / "coordinator" / "ca.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FedradError, match="symbolic link"):
        Provisioner(tmp_path / "prov").provision(load_federation(cfg))
    assert (tmp_path / "elsewhere").read_text() == ""


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_keygen_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path) -> None:
    pub = hospital_keygen(tmp_path, "hospital-a")
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split()[1] == fingerprint(pub.read_bytes())
