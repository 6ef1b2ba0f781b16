"""SecAgg+ in deployment, end to end over TLS on loopback: ``fedrad coordinator start`` (TLS, node
authentication), four ``fedrad-node start`` hospitals (warm runtime, app approval, a node policy
that requires secure aggregation) and ``fedrad run`` of a 2-round DP study with
``secure_aggregation.enabled``. One hospital is killed in round 1 after key sharing (while it
trains, i.e. after its ledger charged the round): the round still aggregates the other three (its
pairwise masks are removed with their shares), round 2 runs with three, the study completes, and
the coordinator's records show only masked vectors.

Built on the deployment helpers of ``tests/deploy`` (processes stopped by PID, free ports).
Marked slow (a few minutes on 2 cores; most of it is the round timeout spent waiting for the
killed hospital).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

import tests.deploy.test_e2e_cli as e2e
from tests.deploy.conftest import Procs, procs, wait_for  # noqa: F401 - procs is the fixture

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1400)]

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
VICTIM = "hospital-d"
ROUND_TIMEOUT_S = 45.0  # covers one SecAgg+ stage on 2 busy cores; the killed hospital costs one of these
Q, MOD = 2**22, 2**32


def _study(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "federation": {"name": "secagg-deploy", "num_hospitals": 4, "rounds": 2, "min_hospitals": 3, "seed": 1,
                       "round_timeout_s": ROUND_TIMEOUT_S},
        "model": {"name": "cnn", "options": {"widths": [4, 8], "dense": 8}},
        "data": {"class_names": ["normal", "pneumonia"], "max_test": 64},
        "privacy": {"enabled": True, "epsilon": 50.0, "max_grad_norm": 20.0},
        "training": {"batch_size": 32, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1},
        "secure_aggregation": {"enabled": True, "quantization_range": Q, "modulus_range": MOD},
    }))
    return path


@pytest.fixture()
def federation(tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> Iterator[e2e.Federation]:  # noqa: F811
    monkeypatch.setenv("PATH", f"{e2e.BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # flwr, as the CLIs need it
    monkeypatch.setattr(e2e, "HOSPITALS", HOSPITALS)
    monkeypatch.setattr(e2e, "POLICY", {**e2e.POLICY, "require_secure_aggregation": True, "min_hospitals": 3})
    f = e2e.Federation(tmp_path, procs)
    # the victim gets more training data, so that it is still training when it is killed
    kit = f.prov / "nodes" / VICTIM
    a = f.arrays
    np.savez(kit / "site.npz", train_images=a["train_images"][1000:2500], train_labels=a["train_labels"][1000:2500],
             val_images=a["val_images"][300:360], val_labels=a["val_labels"][300:360],
             test_images=a["test_images"][100:120], test_labels=a["test_labels"][100:120])
    f.start_coordinator()
    yield f


def _ledger_entries(f: e2e.Federation, name: str) -> int:
    """Training rounds the node has reserved (not its one-off dataset releases, not evaluations)."""
    path = f.prov / "nodes" / name / "state" / "privacy-ledger.json"
    try:
        entries = json.loads(path.read_text())["entries"]
        return len([e for e in entries if e.get("account") == "train" and not str(e.get("study")).startswith("<")])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_secagg_study_over_tls_survives_a_hospital_killed_after_key_sharing(federation: e2e.Federation) -> None:
    f = federation
    t0 = time.monotonic()
    for name in HOSPITALS:
        f.start_node(name)
    f.wait_online(HOSPITALS)
    t_online = time.monotonic()

    run_dir = f.root / "runs" / "secagg"
    study = _study(f.root / "study.yaml")
    follower = subprocess.Popen([e2e.FEDRAD, "run", "--config", str(study), "--out", str(run_dir), "--wait", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, **e2e.ENV, "FEDRAD_PROV": str(f.prov), "COLUMNS": "200"})
    try:
        # The victim's ledger charges round 1 in the masked-vector stage, i.e. after setup and key
        # sharing and before its masked vector exists: kill it then.
        wait_for(lambda: _ledger_entries(f, VICTIM) >= 1 or follower.poll() is not None, timeout=300, interval=0.1,
                 what=f"{VICTIM} to start training in round 1")
        assert follower.poll() is None, follower.communicate()[0][-3000:]
        f.procs.stop(VICTIM, sig=signal.SIGKILL)
        t_kill = time.monotonic()
        text, _ = follower.communicate(timeout=900)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
    t_done = time.monotonic()
    logs = f.fedrad("logs").stdout
    assert follower.returncode == 0, text[-3000:] + logs[-4000:]

    ids = json.loads((f.prov / "coordinator" / "state" / "nodes.json").read_text())
    victim = f"node-{ids[VICTIM]}"
    others = {f"node-{ids[n]}" for n in HOSPITALS if n != VICTIM}

    # the study completed with both rounds aggregated, like a plain study's outputs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["aggregated"] for r in metrics["rounds"]), "\n".join(map(str, metrics["events"]))
    for name in ("model.pt", "checkpoints/round-0001.pt", "checkpoints/round-0002.pt"):
        assert (run_dir / name).exists(), name
    r1 = metrics["rounds"][0]["hospitals"]
    assert {k for k, h in r1.items() if h.get("secure_aggregation") == "masked update"} == others, r1
    assert r1[victim]["status"].startswith("failed"), r1[victim]
    assert "node-1" not in r1  # a SuperLink-made "node unavailable" error is filed under the hospital it concerns
    assert any("SecAgg+ summed 3 masked updates of 4 sampled" in e for e in metrics["events"]), metrics["events"]

    # what the coordinator recorded of the secure rounds: masked vectors only (uniform over the
    # modulus, where an unmasked quantized update would lie in [0, Q]), and who was summed
    record = json.loads((run_dir / "secure-aggregation.json").read_text())
    rounds = {r["round"]: r for r in record["rounds"]}
    assert set(rounds) == {1, 2}
    assert set(rounds[1]["summed"]) == others and victim in rounds[1]["dropped"], rounds[1]
    assert rounds[1]["threshold"] == 3 and rounds[1]["num_shares"] == 4
    assert set(rounds[2]["summed"]) == others, rounds[2]  # round 2 ran with the three left
    for rnd in rounds.values():
        assert set(rnd["masked_vectors"]) == set(rnd["summed"])
        for stats in rnd["masked_vectors"].values():
            assert stats["values"] > 100
            assert stats["share_above_quantization_range"] > 0.99
            assert abs(stats["mean_over_modulus"] - 0.5) < 0.05
    # each survivor trained both rounds under its own ledger; the victim was charged round 1 only
    for name in HOSPITALS:
        assert _ledger_entries(f, name) == (1 if name == VICTIM else 2), name
    for name in set(HOSPITALS) - {VICTIM}:  # every survivor trained in processes of its warm runtime
        assert f.procs.log(name).count("train task (warm start)") == 2, name
    print(f"\ntimings: hospitals online {t_online - t0:.0f}s, study {t_done - t_online:.0f}s "
          f"(after the kill {t_done - t_kill:.0f}s)")
