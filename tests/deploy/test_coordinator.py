"""The coordinator's pieces without a SuperLink: command lines, Flower CLI config, registration
bookkeeping, waiting for hospitals, and the TLS probe against small local TLS servers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrad.client.commands.node import supernode_command
from fedrad.client.runtime.node import probe_superlink
from fedrad.client.runtime.node_config import load_node_config
from fedrad.common.errors import ConfigError, FederationError
from fedrad.server import coordinator as cdn
from fedrad.server.cli import main as fedrad_main
from fedrad.server.provision import Provisioner, load_federation

from .conftest import provision_federation

FED = "name: t\nsuperlink: {address: coordinator.example.org, port: 8443}\nhospitals: [hospital-a, hospital-b]\n"


@pytest.fixture()
def prov(tmp_path: Path) -> Path:
    (tmp_path / "federation.yaml").write_text(FED)
    provision_federation(tmp_path / "federation.yaml", tmp_path / "prov")
    return tmp_path / "prov"


def test_superlink_command_is_secure_by_default(prov: Path) -> None:
    co = cdn.Coordinator(prov)
    cmd = cdn.superlink_command(co, host="127.0.0.1", port=9999, insecure=False)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile",
                 "--ssl-keyfile", "--ssl-ca-certfile", "--database"):
        assert flag in cmd
    assert "--insecure" not in cmd and str(co.coord / "ca.key") not in cmd
    assert cmd[cmd.index("--database") + 1].endswith("state/superlink.db")
    plain = cdn.superlink_command(co, host="127.0.0.1", port=9999, insecure=True)
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain


def test_flwr_config_and_app(prov: Path) -> None:
    co = cdn.Coordinator(prov)
    cdn.write_flwr_config(co, address=cdn.local_address(co, 8443), insecure=False)
    text = (co.flwr_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:8443"' in text and str(co.ca) in text  # the certificate always names loopback
    pp = cdn.write_app(co) / "pyproject.toml"
    assert 'serverapp = "fedrad.server.app:app"' in pp.read_text() and "run-dir" in pp.read_text()
    assert cdn.QUIET_ENV["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_server_certificate_names_loopback_for_the_superlinks_own_superexec(prov: Path) -> None:
    cert = x509.load_pem_x509_certificate((prov / "coordinator" / "superlink.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coordinator.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


def test_renew_superlink_keeps_ca_and_node_kits(prov: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (prov / "coordinator" / "ca.pem", prov / "nodes" / "hospital-a" / "node-auth.key")}
    old = (prov / "coordinator" / "superlink.pem").read_bytes()
    assert fedrad_main(["provision", "--config", str(tmp_path / "federation.yaml"), "--out", str(prov),
                        "renew-superlink"]) == 0
    assert (prov / "coordinator" / "superlink.pem").read_bytes() != old
    assert all(p.read_bytes() == b for p, b in before.items())


class FakeFlwr:
    """Stands in for the ``flwr`` CLI: a node table and what was asked."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def __call__(self, co: cdn.Coordinator, args: list[str], *, timeout: float = 60.0) -> dict[str, Any]:
        self.calls.append(list(args))
        if args[:2] == ["supernode", "ls"]:
            return {"success": True, "nodes": [{"node-id": k, "status": v} for k, v in self.nodes.items()]}
        if args[:2] == ["supernode", "register"]:
            node_id = str(1000 + len(self.nodes))
            self.nodes[node_id] = "registered"
            return {"success": True, "node-id": int(node_id)}
        if args[:2] == ["supernode", "unregister"]:
            self.nodes[args[2]] = "unregistered"
            return {"success": True}
        raise AssertionError(args)


def test_registration_is_idempotent_and_revocation_unregisters(prov: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeFlwr()
    monkeypatch.setattr(cdn, "flwr_json", fake)
    co = cdn.Coordinator(prov)
    reg = cdn.register_nodes(co)
    assert set(reg) == {"hospital-a", "hospital-b"}
    n_calls = len(fake.calls)
    assert cdn.register_nodes(co) == reg and len(fake.calls) == n_calls + 1  # only a listing
    Provisioner(prov).revoke("hospital-b")
    reg2 = cdn.register_nodes(co)
    assert set(reg2) == {"hospital-a"} and fake.nodes[reg["hospital-b"]] == "unregistered"


def test_waiting_for_hospitals_names_the_missing(prov: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    co = cdn.Coordinator(prov)
    co.save_registry({"hospital-a": "1", "hospital-b": "2"})
    monkeypatch.setattr(cdn, "flwr_json", lambda *a, **k: {"success": True, "nodes": [
        {"node-id": 1, "status": "online"}, {"node-id": 2, "status": "offline"}]})
    assert [n.name for n in cdn.wait_for_hospitals(co, needed=1, timeout=0)] == ["hospital-a"]
    with pytest.raises(FederationError, match=r"only 1 hospital.*needs 2.*hospital-b"):
        cdn.wait_for_hospitals(co, needed=2, timeout=0.2, poll=0.05)


def test_cli_without_a_running_coordinator_says_how_to_start_it(prov: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedrad_main(["status", "--prov", str(prov)]) == FederationError.exit_code
    assert "fedrad coordinator start" in capsys.readouterr().err



# -- TLS probe ------------------------------------------------------------------------------
def _cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, *, names: list[str], days: float
          ) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    san = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False).sign(ca_key, hashes.SHA384()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture()
def tls_server(prov: Path, tmp_path: Path) -> Iterator[Any]:
    """Factory: a one-thread TLS server on 127.0.0.1 with a certificate from the federation CA."""
    ca_key = serialization.load_pem_private_key((prov / "coordinator" / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((prov / "coordinator" / "ca.pem").read_bytes())
    socks: list[socket.socket] = []

    def start(names: list[str], days: float = 30) -> str:
        cert, key = _cert(ca_key, ca, names=names, days=days)  # type: ignore[arg-type]
        (tmp_path / "s.pem").write_bytes(cert)
        (tmp_path / "s.key").write_bytes(key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)

        def serve() -> None:
            for _ in range(4):
                try:
                    conn, _ = srv.accept()
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except OSError:
                    pass

        threading.Thread(target=serve, daemon=True).start()
        return f"127.0.0.1:{srv.getsockname()[1]}"

    yield start
    for s in socks:
        s.close()


def test_probe_names_each_tls_problem(prov: Path, tls_server: Any, tmp_path: Path) -> None:
    ca = prov / "coordinator" / "ca.pem"
    good = tls_server(["127.0.0.1"])
    assert probe_superlink(good, ca=ca, insecure=False) is None
    assert cdn.probe(good, ca=ca, insecure=False) is None
    wrong_name = tls_server(["elsewhere.example.org"])
    assert "hostname mismatch" in probe_superlink(wrong_name, ca=ca, insecure=False)[0]  # type: ignore[index]
    assert "mismatch" in cdn.probe(wrong_name, ca=ca, insecure=False)  # type: ignore[operator]
    expired = tls_server(["127.0.0.1"], days=-1)
    assert "expired" in probe_superlink(expired, ca=ca, insecure=False)[0]  # type: ignore[index]
    assert "expired" in cdn.probe(expired, ca=ca, insecure=False)  # type: ignore[operator]
    (tmp_path / "o.yaml").write_text("name: o\nsuperlink: {address: 127.0.0.1}\nhospitals: [z]\n")
    Provisioner(tmp_path / "other").provision(load_federation(tmp_path / "o.yaml"))
    other_ca = tmp_path / "other" / "coordinator" / "ca.pem"
    assert "not signed by the CA" in probe_superlink(tls_server(["127.0.0.1"]), ca=other_ca, insecure=False)[0]  # type: ignore[index]
    plain = tls_server(["127.0.0.1"])
    assert "requires TLS" in probe_superlink(plain, ca=None, insecure=True)[0]  # type: ignore[index]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert probe_superlink(closed, ca=ca, insecure=False)[0].startswith("unreachable:")  # type: ignore[index]
    assert "not reachable" in cdn.probe(closed, ca=ca, insecure=False)  # type: ignore[operator]


# -- the node's side --------------------------------------------------------------------------
def test_node_command_has_its_own_runtime_port_and_no_key_over_plaintext(prov: Path) -> None:
    y = prov / "nodes" / "hospital-a" / "node.yaml"
    y.write_text(y.read_text() + "runtime_port: 19555\nmax_wait_time_s: 600\n")
    cmd = supernode_command(y, insecure=False)
    assert cmd[cmd.index("--port") + 1] == "19555" and cmd[cmd.index("--max-wait-time") + 1] == "600.0"
    y.write_text(y.read_text().replace("insecure: false", "insecure: true"))
    plain = supernode_command(y, insecure=True)
    assert "--insecure" in plain and "--auth-supernode-private-key" not in plain  # Flower refuses auth without TLS


def test_node_yaml_rejects_bad_ports_and_poll_intervals(tmp_path: Path) -> None:
    p = tmp_path / "node.yaml"
    p.write_text("site: x\nsuperlink: h:1\ndata: {path: d.npz}\nruntime_port: 70000\npoll_interval_s: 0\n")
    with pytest.raises(ConfigError) as err:
        load_node_config(p)
    text = "\n".join(err.value.problems)
    assert "runtime_port" in text and "70000" in text and "poll_interval_s" in text
