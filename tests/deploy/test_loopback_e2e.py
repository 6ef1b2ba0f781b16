"""A real federation on 127.0.0.1: flower-superlink with TLS and SuperNode authentication,
three hospital SuperNodes from provisioned node kits, a study submitted with ``flwr run`` against
``deploy/app``, then a revocation that the SuperLink enforces.

Opt-in (about 2-3 minutes): ``FEDRAD_E2E=1 python -m pytest tests/deploy/test_loopback_e2e.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedrad.client.cmd_node import supernode_command
from fedrad.server.provision import Provisioner, load_federation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FEDRAD_E2E") != "1", reason="set FEDRAD_E2E=1 to run the loopback federation"),
]
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NPZ = ROOT / "fedrad" / "data" / "pneumoniamnist.npz"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flwr(env: dict[str, str], *args: str) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return json.loads(proc.stdout[proc.stdout.find("{"):])


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], dict[str, subprocess.Popen[bytes]]]]:
    port = _free_port()
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump({"name": "loop", "hospitals": list(HOSPITALS),
                                   "superlink": {"address": "127.0.0.1", "port": port, "dns_names": ["localhost"]}}))
    out = tmp_path / "fed"
    Provisioner(out).provision(load_federation(fed))
    with np.load(NPZ) as d:
        arrays = {k: d[k] for k in d.files}
    for i, name in enumerate(HOSPITALS):
        kit = out / "nodes" / name
        np.savez(kit / "site.npz", **{k: v[i * 150:(i + 1) * 150] for k, v in arrays.items()})
        (kit / "node.yaml").write_text((kit / "node.yaml").read_text().replace("/path/to/site-data.npz", "site.npz"))
    env = {**os.environ, "FEDRAD_PORT": str(port), "FEDRAD_HOST": "127.0.0.1", "FEDRAD_STATE": str(tmp_path / "state"),
           "FLWR_HOME": str(tmp_path / "state" / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        procs["superlink"] = subprocess.Popen(["bash", str(DEPLOY / "fedrad-coordinator.sh"), str(out)], env=env,
                                              stdout=(logs / "superlink.log").open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (logs / "superlink.log").read_text()
                time.sleep(0.5)
        time.sleep(2)
        sync = subprocess.run([sys.executable, str(DEPLOY / "sync-supernodes.py"), "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        for name in HOSPITALS:
            cmd = supernode_command(out / "nodes" / name / "node.yaml", insecure=False)
            procs[name] = subprocess.Popen([*cmd, "--port", str(_free_port())], env=env,
                                           stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
        yield out, env, procs
    finally:
        for p in reversed(list(procs.values())):
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_tls_federation_runs_a_study_and_enforces_revocation(
    federation: tuple[Path, dict[str, str], dict[str, subprocess.Popen[bytes]]], tmp_path: Path,
) -> None:
    out, env, procs = federation
    deadline = time.monotonic() + 90
    while True:
        nodes = _flwr(env, "supernode", "list", "fedrad")["nodes"]
        if sum(n["status"] == "online" for n in nodes) == 3:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(2)

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "federation": {"name": "loopback", "num_hospitals": 3, "rounds": 2, "min_hospitals": 3, "seed": 1},
        "model": {"name": "cnn", "options": {"widths": [4, 8], "dense": 8}},
        "data": {"class_names": ["normal", "pneumonia"], "max_test": 64},
        "privacy": {"epsilon": 8.0}, "training": {"batch_size": 32, "device": "cpu"},
    }))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["flwr", "run", str(DEPLOY / "app"), "fedrad", "--stream", "--run-config",
         f"study-config={json.dumps(str(study))} run-dir={json.dumps(str(run_dir))}"],
        env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "metrics.json").exists(), proc.stdout[-4000:] + proc.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    for name in HOSPITALS:  # each hospital's ledger lives in its own state folder, under its own name
        ledger = json.loads((out / "nodes" / name / "state" / "privacy-ledger.json").read_text())
        assert len(ledger["entries"]) == 2

    Provisioner(out).revoke("hospital-c", reason="e2e")
    sync = subprocess.run([sys.executable, str(DEPLOY / "sync-supernodes.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert sync.returncode == 0 and "unregistered revoked hospital-c" in sync.stdout, sync.stderr
    procs["hospital-c"].wait(timeout=60)  # the SuperLink drops the revoked node
    cmd = supernode_command(out / "nodes" / "hospital-c" / "node.yaml", insecure=False)
    # Output to a file, not a pipe: the SuperNode's SuperExec child would hold a pipe open.
    log = tmp_path / "hospital-c-again.log"
    with log.open("wb") as fh:
        again = subprocess.Popen([*cmd, "--port", str(_free_port()), "--max-retries", "2"], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = again.wait(timeout=120)
        finally:
            if again.poll() is None:
                again.kill()
    assert rc != 0 and "Failed to activate SuperNode" in log.read_text(), shlex.join(cmd)
