"""Code approval against real Flower processes: flower-superlink, flower-supernode behind the gate, flwr run.

The approved app runs; the same app modified by one line is refused with ERR_POLICY before it is
even unpacked on the node, and the refusal is in the node's audit log. Foreign code pre-placed in
Flower's app folder under the approved app's name never runs (refused, audited, removed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrad.client.governance.approval import AppAllowList, fab_hash, inspect_fab
from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime.gate import check_gated, gated_env, write_shim
from fedrad.common.protocol import ERR_POLICY

#: Flower's commands of this environment (its bin folder need not be on PATH).
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600),
              pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                 reason="no Flower CLI beside the interpreter")]

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "e2eapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "coordinator"

[tool.flwr.app.components]
serverapp = "e2eapp.server:app"
clientapp = "e2eapp.client:app"

[tool.flwr.app.config]
"""
CLIENT = """from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"ran": 1})}), reply_to=msg)
"""
SERVER = """import json, os, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes = []
    for _ in range(60):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(0.5)
    msgs = [Message(RecordDict({"config": ConfigRecord({"study-id": "e2e", "server-round": 1})}), dst_node_id=n,
                    message_type="query") for n in nodes]
    out = []
    for r in grid.send_and_receive(msgs, timeout=120):
        out.append({"code": r.error.code if r.has_error() else None,
                    "reason": r.error.reason if r.has_error() else None,
                    "metrics": None if r.has_error() else dict(r.content["metrics"])})
    with open(os.environ["E2E_OUT"], "w") as fh:
        json.dump(out, fh)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[dict[str, object]]:
    app = tmp_path / "app"
    (app / "e2eapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "e2eapp" / "__init__.py").write_text("")
    (app / "e2eapp" / "client.py").write_text(CLIENT)
    (app / "e2eapp" / "server.py").write_text(SERVER)
    link_port, runtime_port = _port(), _port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    node = tmp_path / "node"
    node.mkdir()
    (node / "node.yaml").write_text(f"site: hospital-a\nsuperlink: 127.0.0.1:{link_port}\ninsecure: true\n"
                                    "data: {path: site.npz}\nstate_dir: state\n")
    out = tmp_path / "result.json"
    base = {**os.environ, "FLWR_HOME": str(home), "E2E_OUT": str(out),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    bin_dir = node / "state" / "bin"
    write_shim(bin_dir)
    node_env = gated_env(bin_dir=bin_dir, node_config=node / "node.yaml", base={**base, "FLWR_HOME": str(tmp_path / "nh")})
    check_gated(node_env, bin_dir=bin_dir)
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--port", str(link_port)],
                                      env=base, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_listening(link_port, timeout=120)
        # The SuperNode as `fedrad-node start` runs it, behind a wrapper that puts Flower's own
        # (ungated) flwr-clientapp and flower-superexec first on PATH, as pyenv's shims do.
        flower_clientapp = shutil.which("flwr-clientapp", path=os.pathsep.join(
            [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]))
        assert flower_clientapp is not None, "Flower's own flwr-clientapp not found beside the interpreter"
        flower_bin = str(Path(flower_clientapp).parent)
        procs.append(subprocess.Popen(
            ["/bin/sh", "-c", 'PATH="$FLOWER_BIN:$PATH" exec "$@"', "sh",
             sys.executable, "-m", "fedrad.client.runtime.node", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
             "--port", str(runtime_port), "--node-config", f'fedrad-node-config="{node / "node.yaml"}"'],
            env={**node_env, "FLOWER_BIN": flower_bin}, stdout=open(tmp_path / "supernode.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        yield {"app": app, "env": base, "node": node, "out": out, "tmp": tmp_path}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _wait_listening(port: int, *, timeout: float) -> None:
    """Until something accepts on 127.0.0.1:``port`` (bounded: the SuperLink starts slowly on a loaded host)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _run(fed: dict[str, object]) -> list[dict[str, object]]:
    out = Path(str(fed["out"]))
    out.unlink(missing_ok=True)
    res = subprocess.run([str(BIN / "flwr"), "run", str(fed["app"]), "local", "--stream"], env=fed["env"], capture_output=True,
                         text=True, timeout=180)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text())


EVIL_CLIENT = """from pathlib import Path
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("foreign code ran")
app = ClientApp()
"""


def test_real_supernode_runs_approved_app_and_refuses_modified_one(federation: dict[str, object]) -> None:
    app, tmp, node = Path(str(federation["app"])), Path(str(federation["tmp"])), Path(str(federation["node"]))
    subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=tmp, env=federation["env"], check=True,
                   capture_output=True, timeout=60)
    (fab,) = tmp.glob("*.fab")
    content = fab.read_bytes()
    AppAllowList.for_state_dir(node / "state").approve(digest=fab_hash(content), by="e2e", info=inspect_fab(content))
    log = AuditLog(node / "state" / "audit.jsonl", key_file=node / "audit.key")

    # Point 5 of issue 9: code pre-placed where Flower would load the approved app from.
    marker = tmp / "PWNED"
    placed = tmp / "nh" / "apps" / f"coordinator.e2eapp.1.0.0.{fab_hash(content)[:8]}"
    (placed / "e2eapp").mkdir(parents=True)
    (placed / "pyproject.toml").write_text(PYPROJECT.replace("e2eapp.client:app", "e2eapp.evil:app"))
    (placed / "e2eapp" / "__init__.py").write_text("")
    (placed / "e2eapp" / "evil.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    (reply,) = _run(federation)
    assert reply["code"] == ERR_POLICY and "not the approved bundle" in str(reply["reason"])
    assert not marker.exists() and not placed.exists()
    assert log.verify() == [] and "e2eapp/evil.py" in log.entries()[-1]["outcome"]

    (reply,) = _run(federation)
    assert reply["code"] is None and reply["metrics"] == {"ran": 1}

    with open(app / "e2eapp" / "client.py", "a") as fh:
        fh.write("# changed after approval\n")
    (reply,) = _run(federation)
    assert reply["code"] == ERR_POLICY and "rule app_approval" in str(reply["reason"])
    assert not (tmp / "nh" / "apps").exists() or not list((tmp / "nh" / "apps").iterdir())  # gate installs privately
    assert log.verify() == [] and log.entries()[-1]["outcome"].startswith("refused: rule app_approval")
    assert not marker.exists()
