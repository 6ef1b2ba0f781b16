"""Loopback deployment through fedrad's own commands: each hospital makes its own key
(``fedrad-node keygen``), the coordinator provisions with the public keys only, ``fedrad coordinator
start`` (TLS, node authentication, SuperLink on loopback behind the Fleet gateway), three
``fedrad-node start`` hospitals, ``fedrad run``; then what must be refused.

The TLS scenarios share ONE provisioned federation and coordinator (module-scoped fixture
``federation``) and run in file order, each starting whatever hospitals it needs that are not running;
the plaintext scenario needs a coordinator of its own. Every process runs in its own process group and
is stopped by PID (fixtures ``procs``/``module_procs``), whatever happens. Servers bind 127.0.0.1
only, on free ports. Time limits cover the shared set-up on a loaded machine. Marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedrad.server.provision import Provisioner, load_federation

from .conftest import Procs, _raise_on_sigterm, free_port, install_hospital_key, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]
#: The first TLS test also pays for the shared set-up (keys, provisioning, approvals, coordinator).
FIRST_TIMEOUT_S = 1500

NPZ = Path(__file__).resolve().parents[2] / "fedrad" / "data" / "pneumoniamnist.npz"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
BIN = Path(sys.executable).parent
FEDRAD, NODE = str(BIN / "fedrad"), str(BIN / "fedrad-node")
#: Small enough for 2 busy cores; the node policy is loosened to match (tiny data needs a large budget).
POLICY = {"max_epsilon_per_study": 60.0, "max_epsilon_lifetime": 1000.0, "max_grad_norm": 25.0,
          "min_noise_multiplier": 0.1, "min_hospitals": 2}
ENV = {"OMP_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "COLUMNS": "300"}


def _node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODE, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **ENV})


def _study(path: Path, name: str, *, rounds: int = 2, timeout_s: float = 240.0) -> Path:
    path.write_text(yaml.safe_dump({
        "federation": {"name": name, "num_hospitals": 3, "rounds": rounds, "min_hospitals": 2, "seed": 1,
                       "round_timeout_s": timeout_s},
        "model": {"name": "cnn", "options": {"widths": [4, 8], "dense": 8}},
        "data": {"class_names": ["normal", "pneumonia"], "max_test": 64},
        "privacy": {"enabled": True, "epsilon": 50.0, "max_grad_norm": 20.0},
        "training": {"batch_size": 32, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1},
    }))
    return path


def _kit(prov: Path, name: str, i: int, arrays: dict[str, np.ndarray], **extra: Any) -> Path:
    kit = prov / "nodes" / name
    sl = {f"{s}_{k}": arrays[f"{s}_{k}"][i * n:(i + 1) * n] for s, n in (("train", 200), ("val", 60), ("test", 20))
          for k in ("images", "labels")}
    np.savez(kit / "site.npz", **sl)
    cfg = yaml.safe_load((kit / "node.yaml").read_text())
    cfg.update({"data": {"source": "npz", "path": "site.npz"}, "runtime_port": free_port(), "poll_interval_s": 0.25,
                "privacy": {"epsilon": 50.0, "delta": 1e-5}, "policy": POLICY, **extra})
    (kit / "node.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return kit / "node.yaml"


class Federation:
    def __init__(self, root: Path, procs: Procs) -> None:
        self.root, self.procs = root, procs
        self.port = free_port()
        self.control_port = free_port()
        # the key ceremony: every hospital makes its key pair on its side and hands over the public key
        for name in HOSPITALS:
            self.keygen(name)
        fed = root / "federation.yaml"
        fed.write_text(yaml.safe_dump({
            "name": "loop",
            "hospitals": [{"name": n, "public_key": f"hospital-keys/{n}/node-auth.pub"} for n in HOSPITALS],
            "superlink": {"address": "127.0.0.1", "port": self.port, "control_port": self.control_port}}))
        self.fed_yaml = fed
        self.prov = root / "prov"
        out = self.fedrad("provision", "--config", str(fed), "--out", str(self.prov), timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert not list(self.prov.rglob("node-auth.key"))  # the coordinator never saw a private key
        for name in HOSPITALS:  # each hospital puts its own key beside its kit's node.yaml
            install_hospital_key(root, self.prov / "nodes" / name, name)
        with np.load(NPZ) as d:
            self.arrays = {k: d[k] for k in d.files}
        self.node_yaml = {n: _kit(self.prov, n, i, self.arrays) for i, n in enumerate(HOSPITALS)}
        # The approval ceremony: the coordinator publishes the hash of the app its studies run with,
        # each hospital approves it (nodes refuse unapproved apps by default).
        out = subprocess.run([FEDRAD, "coordinator", "app-hash", "--prov", str(self.prov)], capture_output=True,
                             text=True, timeout=120, check=False, env={**os.environ, **ENV})
        assert out.returncode == 0, out.stderr
        self.app_hash = out.stdout.strip()
        for path in self.node_yaml.values():
            ok = _node("apps", "approve", "--config", str(path), "--hash", self.app_hash, "--by", "e2e")
            assert ok.returncode == 0, ok.stderr

    def keygen(self, name: str) -> Path:
        """``fedrad-node keygen`` on hospital ``name``'s side; returns its PUBLIC key file."""
        out = _node("keygen", "--out", str(self.root / "hospital-keys" / name), "--comment", name)
        assert out.returncode == 0 and "SHA256:" in out.stdout, out.stdout + out.stderr
        return self.root / "hospital-keys" / name / "node-auth.pub"

    def fedrad(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FEDRAD, *args], capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **ENV, "FEDRAD_PROV": str(self.prov), "COLUMNS": "200"}, cwd=self.root)

    def start_coordinator(self) -> None:
        before = self.procs.log("coordinator").count("registered hospitals:")
        self.procs.start("coordinator", [FEDRAD, "coordinator", "start", "--prov", str(self.prov),
                                         "--host", "127.0.0.1"], env=ENV)
        wait_for(lambda: self.procs.log("coordinator").count("registered hospitals:") > before
                 or self.procs.started["coordinator"].poll() is not None, timeout=120, what="the coordinator")
        assert self.procs.started["coordinator"].poll() is None, self.procs.log("coordinator")

    def start_node(self, name: str, *extra: str, config: Path | None = None) -> subprocess.Popen[bytes]:
        path = config or self.node_yaml[name]
        cfg = yaml.safe_load(path.read_text())
        cfg["runtime_port"] = free_port()  # chosen just before the start: other tests on this host pick ports too
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self.procs.start(name, [NODE, "start", "--config", str(path), *extra], env=ENV)

    def ensure_online(self, names: tuple[str, ...], timeout: float = 240) -> None:
        """Start each of ``names`` that is not running, then wait until all are online."""
        for name in names:
            proc = self.procs.started.get(name)
            if proc is None or proc.poll() is not None:
                self.start_node(name)
        self.wait_online(names, timeout=timeout)

    def wait_online(self, names: tuple[str, ...], timeout: float = 180) -> None:
        def ready() -> bool:
            for name in names:
                proc = self.procs.started[name]
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.procs.log(name)[-3000:]}"
            return sum(s == "online" for n, s in self.nodes().items() if n in names) == len(names)

        wait_for(ready, timeout=timeout, interval=2, what=f"{', '.join(names)} online")

    def nodes(self) -> dict[str, str]:
        out = self.fedrad("status", "--json", timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return {n["name"]: n["status"] for n in json.loads(out.stdout)["nodes"]}


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    """Like ``procs``, for the processes of the module's shared federation."""
    p = Procs(tmp_path_factory.mktemp("federation"))
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield p
    finally:
        p.stop_all()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def federation(module_procs: Procs) -> Federation:
    f = Federation(module_procs.root, module_procs)
    f.start_coordinator()
    return f


@pytest.mark.timeout(FIRST_TIMEOUT_S)
def test_tls_federation_runs_a_dp_study(federation: Federation) -> None:
    f = federation
    f.ensure_online(HOSPITALS)
    # a 2-round DP study completes and writes the same outputs as a simulation
    run1 = f.root / "runs" / "first"
    out = f.fedrad("run", "--config", str(_study(f.root / "s1.yaml", "first")), "--out", str(run1), "--wait", "30")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + f.procs.log("coordinator")[-3000:]
    for name in ("metrics.json", "model.pt", "loss.png", "epsilon.png", "checkpoints/round-0002.pt"):
        assert (run1 / name).exists(), name
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(len(r["hospitals"]) == 3 and r["aggregated"] for r in metrics["rounds"])
    assert "hospital-a" in out.stdout  # progress names hospitals, not Flower node ids
    for name in HOSPITALS:  # each node's ledger is in its own state folder
        ledger = json.loads((f.prov / "nodes" / name / "state" / "privacy-ledger.json").read_text())
        trained = [e for e in ledger["entries"] if e["account"] == "train" and not e["study"].startswith("<")]
        assert len(trained) == 2  # two rounds reserved (beside the one-off size release and the evaluations)
        # every message ran in a process forked by the node's warm runtime (no cold imports)
        log = f.procs.log(name)
        assert "warm ClientApp runtime ready" in log
        assert log.count("train task (warm start)") >= 2, log[-3000:]
        assert "(cold start)" not in log
        # the SuperNode logs at INFO: no line per poll request (Flower's HTTP client logs those at INFO)
        assert "HTTP Request:" not in log and "Runtime.AcquireTask" not in log, log[-2000:]


def test_a_node_killed_mid_round_is_let_back_in(federation: Federation) -> None:
    # hospital-c is killed while training in round 1: the round completes with the other two
    # (min_hospitals=2); hospital-c is restarted at once, is let back in once the coordinator has
    # noticed the old connection is gone (its launcher keeps retrying), and trains again. Round 1 ends
    # when that connection lapses, so hospital-c usually misses round 2 and trains in round 3 only;
    # the final model's evaluate message comes after that round, and its outcome must not hide it.
    f = federation
    f.ensure_online(HOSPITALS)
    run2 = f.root / "runs" / "second"
    study2 = _study(f.root / "s2.yaml", "second", rounds=3, timeout_s=60.0)
    follower = subprocess.Popen([FEDRAD, "run", "--config", str(study2), "--out", str(run2), "--wait", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, **ENV, "FEDRAD_PROV": str(f.prov), "COLUMNS": "200"})
    try:
        marker = f.procs.log("hospital-c").count("Start `flwr-clientapp`")
        wait_for(lambda: f.procs.log("hospital-c").count("Start `flwr-clientapp`") > marker, timeout=180,
                 what="hospital-c to start training in run 2")
        f.procs.stop("hospital-c", sig=signal.SIGKILL)
        f.start_node("hospital-c")  # rejoins with the same key, hence the same node id
        text, _ = follower.communicate(timeout=600)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
    assert follower.returncode == 0, text[-3000:]
    metrics = json.loads((run2 / "metrics.json").read_text())
    rounds = metrics["rounds"]
    first, later = rounds[0], rounds[1:]
    trained = [k for k, h in first["hospitals"].items() if _trained(h)]
    assert first["aggregated"] and len(trained) == 2 and "hospital-c" not in trained, first
    assert all(r["aggregated"] for r in later)
    # rejoined with the same key: the same row, named from the coordinator's registry (no phantom node-<id>)
    # Flower refuses the restarted node while the killed connection still counts online; the SuperNode
    # retries that refusal in-process (no relaunch), so it is back as round 1 ends, in time for round 3
    assert any(_trained(r["hospitals"].get("hospital-c", {})) for r in later), _context(f, metrics, text)
    assert all(set(r["hospitals"]) <= set(HOSPITALS) for r in rounds), rounds


def _context(f: Federation, metrics: dict[str, Any], follower: str) -> str:
    """What a failed killed-node assertion shows: hospital-c's row per round, the run's progress and
    events, and the fedrad lines of hospital-c's log (Flower's poll chatter left out)."""
    keys = ("status", "val_status", "steps", "node_round", "node_eval_round", "val_reported_examples")
    rows = [f"round {r['round']} aggregated={r['aggregated']} hospitals={sorted(r['hospitals'])} hospital-c="
            f"{ {k: r['hospitals'].get('hospital-c', {}).get(k) for k in keys} }" for r in metrics["rounds"]]
    node = [ln for ln in f.procs.log("hospital-c").splitlines()
            if "fedrad" in ln or "Receiving" in ln or "Sending" in ln or "SuperNode" in ln or "ERROR" in ln]
    return "\n".join([*rows, "--- events ---", *map(str, metrics.get("events", [])), "--- run output ---",
                      follower[-4000:], "--- hospital-c ---", *node[-60:]])


def _trained(record: dict[str, Any]) -> bool:
    """A hospital's round record says it trained (its update was used): status ok, DP steps taken."""
    return record.get("status", "ok") == "ok" and int(record.get("steps") or 0) > 0


def test_the_coordinator_restarts_and_every_hospital_reconnects(federation: Federation) -> None:
    # SIGTERM, then start again: its database keeps the registrations and runs
    f = federation
    f.ensure_online(HOSPITALS)
    runs_before = len(json.loads(f.fedrad("status", "--json").stdout)["runs"])
    assert f.procs.stop("coordinator") == 0
    f.start_coordinator()
    f.wait_online(HOSPITALS, timeout=300)
    status = f.fedrad("status", "--json")
    assert len(json.loads(status.stdout)["runs"]) == runs_before
    logs = f.fedrad("logs")  # the latest run's ServerApp log
    assert logs.returncode == 0, logs.stderr
    if runs_before:
        assert logs.stdout.strip()


def test_a_submitted_run_can_be_stopped(federation: Federation) -> None:
    f = federation
    f.ensure_online(HOSPITALS)
    run3 = f.root / "runs" / "third"
    sub = f.fedrad("run", "--config", str(_study(f.root / "s3.yaml", "third", rounds=50)), "--out", str(run3),
                   "--wait", "120", "--detach")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    run_id = (run3 / "flower-run-id").read_text().strip()
    stop = f.fedrad("stop", run_id)
    assert stop.returncode == 0, stop.stdout + stop.stderr

    def stopped() -> bool:
        runs = json.loads(f.fedrad("status", "--json").stdout)["runs"]
        return any(r["run-id"] == run_id and str(r["status"]).startswith("finished") for r in runs)

    wait_for(stopped, timeout=120, interval=3, what="the stopped run to finish")
    if (run3 / "metrics.json").exists():  # `fedrad stop` marks what the ServerApp could not
        status = json.loads((run3 / "metrics.json").read_text())["status"]
        assert status == "interrupted"  # the ServerApp saves nothing after the stop request


def test_what_must_be_refused(federation: Federation, tmp_path: Path) -> None:
    f = federation
    # an unregistered key: added after the coordinator registered the others, so the SuperLink refuses it
    Provisioner(f.prov).add_node(load_federation(f.fed_yaml), "hospital-x", public_key=f.keygen("hospital-x"))
    install_hospital_key(f.root, f.prov / "nodes" / "hospital-x", "hospital-x")
    x_yaml = _kit(f.prov, "hospital-x", 3, f.arrays, rejoin_timeout_s=0)
    x = f.start_node("hospital-x", config=x_yaml)
    from fedrad.client.commands.node import NodeRefusedError

    assert x.wait(timeout=180) == NodeRefusedError.exit_code, f.procs.log("hospital-x")[-2000:]
    assert "activate" in f.procs.log("hospital-x").lower(), f.procs.log("hospital-x")[-2000:]

    # a node that trusts another federation's CA cannot connect (fails before joining, names the CA)
    other = tmp_path / "other"
    other.mkdir()
    (other / "f.yaml").write_text("name: other\nsuperlink: {address: 127.0.0.1}\nhospitals: [z]\n")
    Provisioner(other / "prov").provision(load_federation(other / "f.yaml"))
    kit_a = f.node_yaml["hospital-a"].parent
    wrong = tmp_path / "wrong-ca"
    live = shutil.ignore_patterns("state")  # hospital-a runs: its state folder holds live sockets
    shutil.copytree(kit_a, wrong, ignore=live)
    shutil.copy(other / "prov" / "coordinator" / "ca.pem", wrong / "ca.pem")
    out = _node("start", "--config", str(wrong / "node.yaml"))
    assert out.returncode != 0 and "not signed by the CA" in out.stderr, out.stderr
    check = _node("check", "--config", str(wrong / "node.yaml"))
    assert check.returncode == 1 and "ca.pem" in check.stderr

    # plaintext: --insecure alone is refused; insecure on the node's side only is refused by the TLS coordinator
    out = _node("start", "--config", str(f.node_yaml["hospital-a"]), "--insecure")
    assert out.returncode != 0 and "both" in out.stderr
    plain = tmp_path / "plain"
    shutil.copytree(kit_a, plain, ignore=live)
    cfg = yaml.safe_load((plain / "node.yaml").read_text())
    (plain / "node.yaml").write_text(yaml.safe_dump({**cfg, "insecure": True}))
    out = _node("start", "--config", str(plain / "node.yaml"), "--insecure")
    assert out.returncode != 0 and "requires TLS" in out.stderr, out.stderr
    assert f.nodes().get("hospital-x") != "online"  # nothing above ever joined (the copies hold a's key: refused
    # before joining, as their logs say)

    # a stranger on the public (Fleet) port cannot list or submit runs; the operator's CLI still can
    import http.client
    import ssl

    ca = ssl.create_default_context(cafile=str(f.prov / "coordinator" / "ca.pem"))
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/list-nodes"):
        conn = http.client.HTTPSConnection("127.0.0.1", f.port, context=ca, timeout=30)
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        assert conn.getresponse().status == 404, path
        conn.close()
    stranger = tmp_path / "stranger-flwr"
    stranger.mkdir()
    (stranger / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{f.port}"\n'
        f'root-certificates = "{f.prov / "coordinator" / "ca.pem"}"\n')
    for args in (["ls", "x"], ["run", str(f.prov / "coordinator" / "state" / "app"), "x"]):
        out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
                             timeout=120, check=False, env={**os.environ, **ENV, "FLWR_HOME": str(stranger)})
        answer = json.loads(out.stdout[out.stdout.index("{"):]) if "{" in out.stdout else {}
        assert out.returncode != 0 or not answer.get("success"), out.stdout
    assert f.fedrad("status", "--json").returncode == 0  # the Control API on loopback still serves the operator
    listening = [ln.split() for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    control = [row for row in listening if row[3] == "0A" and int(row[1].split(":")[1], 16) == f.control_port]
    assert control and all(row[1].split(":")[0] == "0100007F" for row in control)  # 127.0.0.1 only


def test_a_revoked_node_leaves_quickly_with_the_documented_exit_code(federation: Federation) -> None:
    # arrange: hospital-b is online
    f = federation
    f.ensure_online(("hospital-b",))
    node = f.procs.started["hospital-b"]
    # act: the coordinator revokes it and unregisters its key at once
    out = f.fedrad("provision", "--out", str(f.prov), "revoke", "hospital-b", "--reason", "test")
    assert out.returncode == 0, out.stdout + out.stderr
    t0 = time.monotonic()
    reg = f.fedrad("coordinator", "register", "--prov", str(f.prov))
    assert reg.returncode == 0, reg.stdout + reg.stderr
    # assert: it leaves within Flower's online window plus a few retries, not after rejoin_timeout_s
    # (300 s), with NodeRefusedError's code (the guide's "exit 10")
    from fedrad.client.commands.node import NodeRefusedError

    rc = node.wait(timeout=400)
    assert rc == NodeRefusedError.exit_code, f.procs.log("hospital-b")[-3000:]
    assert time.monotonic() - t0 < 240, time.monotonic() - t0
    assert "refuses this node" in f.procs.log("hospital-b")


def test_plaintext_only_with_insecure_on_both_sides(tmp_path: Path, procs: Procs) -> None:
    f = Federation(tmp_path, procs)
    procs.start("coordinator", [FEDRAD, "coordinator", "start", "--prov", str(f.prov), "--host", "127.0.0.1",
                                "--insecure"], env=ENV)
    wait_for(lambda: "PLAINTEXT" in procs.log("coordinator") or procs.started["coordinator"].poll() is not None,
             timeout=120, what="the insecure coordinator")
    # a TLS node cannot talk to a plaintext coordinator
    out = _node("start", "--config", str(f.node_yaml["hospital-a"]))
    assert out.returncode != 0 and "TLS" in out.stderr, out.stderr
    # insecure on both sides: the node joins
    y = f.node_yaml["hospital-b"]
    y.write_text(y.read_text().replace("insecure: false", "insecure: true"))
    f.start_node("hospital-b", "--insecure")
    wait_for(lambda: "online" in f.nodes().values(), timeout=120, interval=2, what="the plaintext node to be online")
