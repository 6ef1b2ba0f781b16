"""Per-round overhead of a real deployment on loopback (TLS, node authentication).

Starts ``fedrad coordinator start`` and N ``fedrad-node start`` hospitals on 127.0.0.1, submits a
study with ``fedrad run`` and reads the run folder. Per round:

* ``round wall``: time between consecutive round checkpoints (train + both polls + evaluation
  messages + the process each message starts on each node);
* ``slowest train``: the largest ``train_seconds`` any hospital reported for that round;
* ``overhead`` = round wall - slowest train (round 1 has no previous checkpoint: not counted).

Settings compared (``--settings``; ``flower`` and ``polls`` turn the node's warm runtime off):

* ``flower``: Flower 1.41's defaults: SuperNode polls every 3 s, SuperExec every 1 s, the
  ServerApp's Grid checks for replies every 3 s;
* ``polls``: SuperNode 0.25 s (``poll_interval_s`` in node.yaml), SuperExec 0.2 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), ServerApp Grid 0.25 s (``fedrad run --poll-interval``);
  each message still starts a cold ``flwr-clientapp`` process (``warm_runtime: false``);
* ``tuned``: the same polls, and each message's process is forked from the node's warm runtime
  (``warm_runtime: true``, the default: torch, Opacus and fedrad imported once per node).

Every process is started in its own process group and stopped by PID, whatever happens.

    python benchmarks/deploy_overhead.py --model resnet18 --rounds 4 --settings flower polls tuned
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / "fedrad" / "data" / "pneumoniamnist.npz"
BIN = Path(sys.executable).parent
SETTINGS: dict[str, dict[str, Any]] = {
    "flower": {"node_poll": None, "superexec_poll": "1.0", "grid_poll": 0.0, "warm": False},
    "polls": {"node_poll": 0.25, "superexec_poll": "0.2", "grid_poll": 0.25, "warm": False},
    "tuned": {"node_poll": 0.25, "superexec_poll": "0.2", "grid_poll": 0.25, "warm": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []  # type: ignore[var-annotated]

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **env}, cwd=self.root)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()


def run_setting(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    s = SETTINGS[name]
    root = work / name
    root.mkdir(parents=True)
    port = free_port()
    hospitals = [f"hospital-{chr(97 + i)}" for i in range(args.hospitals)]
    (root / "federation.yaml").write_text(yaml.safe_dump(
        {"name": "bench", "hospitals": hospitals, "superlink": {"address": "127.0.0.1", "port": port}}))
    env = {"OMP_NUM_THREADS": str(args.threads), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": s["superexec_poll"],
           "COLUMNS": "200"}
    subprocess.run([str(BIN / "fedrad"), "provision", "--config", str(root / "federation.yaml"), "--out",
                    str(root / "prov")], check=True, capture_output=True, env={**os.environ, **env})
    with np.load(NPZ) as d:
        arrays = {k: d[k] for k in d.files}
    for i, h in enumerate(hospitals):
        kit = root / "prov" / "nodes" / h
        np.savez(kit / "site.npz", **{f"{sp}_{k}": arrays[f"{sp}_{k}"][i * n:(i + 1) * n]
                                      for sp, n in (("train", args.train), ("val", 60), ("test", 20))
                                      for k in ("images", "labels")})
        cfg = yaml.safe_load((kit / "node.yaml").read_text())
        cfg.update({"data": {"source": "npz", "path": "site.npz"}, "runtime_port": free_port(),
                    "privacy": {"epsilon": 50.0, "delta": 1e-5},
                    "policy": {"max_epsilon_per_study": 60.0, "max_epsilon_lifetime": 1e4, "max_grad_norm": 25.0,
                               "min_noise_multiplier": 0.1, "max_rounds": 1000}})
        if s["node_poll"] is not None:
            cfg["poll_interval_s"] = s["node_poll"]
        cfg["warm_runtime"] = s["warm"]
        (kit / "node.yaml").write_text(yaml.safe_dump(cfg))
    # the hospitals approve the app the coordinator's studies run with (nodes refuse others)
    app_hash = subprocess.run([str(BIN / "fedrad"), "coordinator", "app-hash", "--prov", str(root / "prov")],
                              check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout.strip()
    for h in hospitals:
        subprocess.run([str(BIN / "fedrad-node"), "apps", "approve", "--config", str(root / "prov" / "nodes" / h /
                        "node.yaml"), "--hash", app_hash, "--by", "benchmark"], check=True, capture_output=True,
                       env={**os.environ, **env})
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump({
        "federation": {"name": "bench", "num_hospitals": args.hospitals, "rounds": args.rounds,
                       "min_hospitals": args.hospitals, "round_timeout_s": 1800},
        "model": {"name": args.model}, "data": {"class_names": ["normal", "pneumonia"], "max_test": 64},
        "privacy": {"enabled": True, "epsilon": 50.0, "max_grad_norm": 20.0},
        "training": {"batch_size": 32, "device": args.device, "num_threads": args.threads},
    }))
    group = Group(root)
    try:
        group.start("coordinator", [str(BIN / "fedrad"), "coordinator", "start", "--prov", str(root / "prov"),
                                    "--host", "127.0.0.1", "--poll-interval", s["superexec_poll"]], env)
        deadline = time.monotonic() + 120
        while "registered hospitals:" not in (root / "coordinator.log").read_text(errors="replace"):
            if time.monotonic() > deadline or group.procs[0].poll() is not None:
                raise RuntimeError((root / "coordinator.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        for h in hospitals:
            group.start(h, [str(BIN / "fedrad-node"), "start", "--config", str(root / "prov" / "nodes" / h / "node.yaml")],
                        env)
        run_dir = root / "run"
        t0 = time.monotonic()
        out = subprocess.run([str(BIN / "fedrad"), "run", "--prov", str(root / "prov"), "--config", str(study),
                              "--out", str(run_dir), "--wait", "300", "--poll-interval", str(s["grid_poll"])],
                             capture_output=True, text=True, check=False, env={**os.environ, **env}, timeout=3600)
        total = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    finally:
        group.stop()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = {int(p.stem.split("-")[1]): p.stat().st_mtime for p in (run_dir / "checkpoints").glob("round-*.pt")}
    rows = []
    for r in metrics["rounds"]:
        n = r["round"]
        slowest = max(float(h.get("train_seconds", 0.0)) for h in r["hospitals"].values())
        wall = ckpt[n] - ckpt[n - 1] if n - 1 in ckpt else None
        rows.append({"round": n, "train_phase_s": r["seconds"], "slowest_train_s": slowest, "round_wall_s": wall,
                     "overhead_s": None if wall is None else wall - slowest})
    over = [r["overhead_s"] for r in rows if r["overhead_s"] is not None]
    return {"setting": name, **s, "rounds": rows, "total_s": total,
            "overhead_median_s": statistics.median(over) if over else None,
            "train_median_s": statistics.median(r["slowest_train_s"] for r in rows)}


def import_seconds(module: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--train", type=int, default=200, help="training images per hospital")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", nargs="+", default=["flower", "polls", "tuned"], choices=sorted(SETTINGS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", type=Path, help="keep the provisioning, logs and run folders here (default: deleted)")
    args = ap.parse_args()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "host": os.uname().nodename,
                               "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    results["import_s"] = {m: import_seconds(m) for m in ("torch", "flwr.clientapp", "fedrad.client.runtime.app")}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        results["runs"] = [run_setting(name, args, args.keep) for name in args.settings]
    else:
        with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
            results["runs"] = [run_setting(name, args, Path(tmp)) for name in args.settings]
    results["load_after"] = os.getloadavg()
    print(f"model {args.model}, {args.hospitals} hospitals x {args.train} images, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f}")
    print("import per message (s): " + ", ".join(f"{k} {v:.2f}" for k, v in results["import_s"].items()))
    print(f"{'setting':8} {'round':>5} {'train phase':>11} {'slowest train':>13} {'round wall':>10} {'overhead':>8}")
    for run in results["runs"]:
        for r in run["rounds"]:
            wall = "-" if r["round_wall_s"] is None else f"{r['round_wall_s']:.1f}"
            over = "-" if r["overhead_s"] is None else f"{r['overhead_s']:.1f}"
            print(f"{run['setting']:8} {r['round']:>5} {r['train_phase_s']:>11.1f} {r['slowest_train_s']:>13.1f} "
                  f"{wall:>10} {over:>8}")
        print(f"{run['setting']:8} median overhead {run['overhead_median_s']:.1f}s/round; total {run['total_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
