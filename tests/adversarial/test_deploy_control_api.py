"""Issue 9, point 10: the coordinator's Control API is closed to strangers.

Flower 1.41 serves Fleet, Control and ServerAppIo on one port and (open source) authenticates no
Control API caller. fedrad binds the SuperLink to loopback and puts the Fleet gateway on the
public address. Here the real gateway process runs in front of a recording TLS "SuperLink" on
loopback: Fleet calls pass unchanged, and every way of reaching the Control or runtime API from
the public port is answered 404 without the SuperLink ever seeing it.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedrad.common.errors import FedradError
from fedrad.server import coordinator as cdn
from fedrad.server.provision import Provisioner, load_federation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append(("POST", self.path, body, dict(self.headers.items())))
        payload = b"upstream:" + body
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(("GET", self.path, b"", dict(self.headers.items())))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def prov(tmp_path: Path) -> Path:
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump({"name": "g", "superlink": {"address": "127.0.0.1", "port": _free_port()},
                                   "hospitals": ["hospital-a"]}))
    Provisioner(tmp_path / "prov").provision(load_federation(fed))
    return tmp_path / "prov"


@pytest.fixture()
def gateway(prov: Path) -> Iterator[tuple[int, list[tuple[str, str, bytes, dict[str, str]]]]]:
    """A recording TLS upstream on loopback and the real gateway process in front of it."""
    coord = prov / "coordinator"
    _Recorder.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(coord / "superlink.pem", coord / "superlink.key")
    upstream.socket = ctx.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = _free_port()
    cmd = cdn.gateway_command(cdn.Coordinator(prov), host="127.0.0.1", port=port,
                              control_port=upstream.server_address[1], insecure=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cdn.wait_until_listening(f"127.0.0.1:{port}", ca=coord / "ca.pem", insecure=False, timeout=60, alive=proc)
        yield port, _Recorder.seen
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        upstream.shutdown()
        upstream.server_close()


def _request(prov: Path, port: int, method: str, target: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A raw HTTPS request: the target is sent exactly as written (no client-side normalisation)."""
    ctx = ssl.create_default_context(cafile=str(prov / "coordinator" / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in {"content-length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fleet_calls_pass_unchanged_with_their_authentication_headers(prov: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    port, seen = gateway
    signed = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}

    status, body = _request(prov, port, "POST", "/v1/fleet/pull-messages", b"\x08\x01payload", signed)

    assert status == 200 and body == b"upstream:\x08\x01payload"
    assert [(m, p, b) for m, p, b, _ in seen] == [("POST", "/v1/fleet/pull-messages", b"\x08\x01payload")]
    assert all(seen[0][3].get(k) == v for k, v in signed.items())


@pytest.mark.parametrize(("method", "target"), [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/runtime/pull-task-input"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/fleet/get-run"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
    ("POST", "/v1/fleet%2fpull-messages"),
    ("POST", "//v1/control/list-runs"),
    ("POST", "http://127.0.0.1/v1/control/list-runs"),
])
def test_a_stranger_on_the_public_port_never_reaches_control_or_runtime(prov: Path, gateway,  # type: ignore[no-untyped-def]
                                                                        method: str, target: str) -> None:
    port, seen = gateway

    status, _ = _request(prov, port, method, target, b"{}")

    assert status in (400, 404), status
    assert seen == []  # the SuperLink never saw it


def test_flwr_cli_pointed_at_the_public_port_cannot_list_runs(prov: Path, gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, seen = gateway
    home = tmp_path / "stranger-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{prov / "coordinator" / "ca.pem"}"\n')

    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "x", "--format", "json"],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={"FLWR_HOME": str(home), "PATH": str(Path(sys.executable).parent),
                              "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"})

    text = out.stdout[out.stdout.find("{"):] if "{" in out.stdout else "{}"
    assert out.returncode != 0 or not json.loads(text).get("success", False), out.stdout
    assert seen == []


def test_the_superlink_itself_binds_loopback_only(prov: Path) -> None:
    co = cdn.Coordinator(prov)
    cmd = cdn.superlink_command(co, port=9999, insecure=False)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    for public in ("0.0.0.0", "::", "192.0.2.7"):
        with pytest.raises(FedradError, match="loopback only"):
            cdn.superlink_command(co, host=public, port=9999, insecure=False)
    gw = cdn.gateway_command(co, host="0.0.0.0", port=8000, control_port=8001, insecure=False)
    assert gw[gw.index("--listen") + 1] == "0.0.0.0:8000" and gw[gw.index("--upstream") + 1] == "127.0.0.1:8001"


def test_gateway_answers_503_when_the_superlink_is_down(prov: Path) -> None:
    port, dead = _free_port(), _free_port()
    cmd = cdn.gateway_command(cdn.Coordinator(prov), host="127.0.0.1", port=port, control_port=dead, insecure=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cdn.wait_until_listening(f"127.0.0.1:{port}", ca=prov / "coordinator" / "ca.pem", insecure=False,
                                 timeout=60, alive=proc)
        t0 = time.monotonic()
        assert _request(prov, port, "POST", "/v1/fleet/send-node-heartbeat", b"x")[0] == 503
        assert time.monotonic() - t0 < 30
    finally:
        proc.terminate()
        proc.wait(timeout=10)
