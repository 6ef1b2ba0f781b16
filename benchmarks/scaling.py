"""How the simulation scales with the number of hospitals: wall time and peak memory of the whole
process tree (the coordinator, Ray's processes, the ClientApp actors) for N simulated hospitals on
this machine (a benchmark, not a test).

Each row is the bundled demo study (``fedrad/configs/demo.yaml``: PneumoniaMNIST, the small CNN, DP-SGD
at epsilon 8, FedAvg) with ``federation.num_hospitals`` = N, a few rounds, the training split cut N ways
(``--partition iid`` by default, so every hospital gets about 4708 / N images) and
``federation.min_hospitals`` = 1 (a round aggregates whatever usable updates it gets). Hospitals whose
DP plan is refused by their planner (too little data for the budget: ``fedrad.common.planning``)
refuse every round; the study still completes and the row says how many trained and how many refused.

Memory: the sum over the process tree of RSS, PSS and USS (``/proc/PID/smaps_rollup``), sampled every
``--interval`` seconds; the peak of each sum is reported (PSS is the fair share of pages several
processes map, e.g. torch's libraries; RSS counts them once per process). Usage::

    nice -n 10 python benchmarks/scaling.py --hospitals 10 30 100 --rounds 3 [--partition iid|dirichlet]
    nice -n 10 python benchmarks/scaling.py --hospitals 100 --rev 0d79970   # the engine files of another revision
    python benchmarks/scaling.py --dispatch-sweep 10 30 100   # CPU of one message-dispatch sweep, Flower vs fedrad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_profile import SHIM, _revision_modules
from proctree import TreeSampler

REPO = Path(__file__).resolve().parent.parent
FEDRAD = Path(sys.executable).parent / "fedrad"


def study_yaml(n: int, *, rounds: int, partition: str, epsilon: float) -> dict[str, Any]:
    study = yaml.safe_load((REPO / "fedrad" / "configs" / "demo.yaml").read_text())
    study["federation"].update({"name": f"scale-{n}", "num_hospitals": n, "rounds": rounds, "min_hospitals": 1})
    study["data"]["partition"] = {"scheme": partition} if partition == "iid" else {"scheme": "dirichlet", "alpha": 1.0}
    study["privacy"]["epsilon"] = epsilon
    return study


def _outcome(run_dir: Path) -> dict[str, Any]:
    data = json.loads((run_dir / "metrics.json").read_text())
    rounds = data.get("rounds", [])
    trained, refused, failed = set(), set(), set()
    for r in rounds:
        for name, h in r.get("hospitals", {}).items():
            status = str(h.get("status", "ok"))
            if status == "ok" and "node_round" in h:
                trained.add(name)
            elif status.startswith("refused"):
                refused.add(name)
            elif status != "ok":
                failed.add(name)
    final = data.get("global_test") or (rounds[-1].get("global_test", {}) if rounds else {})
    return {
        "status": data.get("status"),
        "rounds_done": len(rounds),
        "trained": len(trained),
        "refused": len(refused - trained),
        "failed": len(failed - trained - refused),
        "round_seconds": [round(float(r.get("seconds", 0.0)), 2) for r in rounds],
        "test_auc": final.get("auc") if isinstance(final, dict) else None,
        "metrics_json_bytes": (run_dir / "metrics.json").stat().st_size,
        "run_dir_bytes": sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()),
    }


def run_row(n: int, *, rounds: int, partition: str, epsilon: float, interval: float, keep: Path | None,
            timeout_s: float, modules: Path | None = None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"fedrad-scale-{n}-"))
    base = keep / f"n{n}" if keep else tmp
    base.mkdir(parents=True, exist_ok=True)
    config = base / "study.yaml"
    config.write_text(yaml.safe_dump(study_yaml(n, rounds=rounds, partition=partition, epsilon=epsilon)))
    run_dir = base / "run"
    log_path = base / "simulate.log"
    t0 = time.time()
    with log_path.open("w") as log:
        cmd = [str(FEDRAD)] if modules is None else [sys.executable, "-c", SHIM, str(modules)]
        proc = subprocess.Popen([*cmd, "simulate", "--config", str(config), "--out", str(run_dir)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=base,
                                env={**os.environ, "COLUMNS": "200"})
        sampler = TreeSampler(proc.pid, interval=interval, smaps=True).start()
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        timer.cancel()
    wall = time.time() - t0
    sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_by_kind: dict[str, int] = {}
    for p in sampler.procs.values():
        peak_by_kind[p.kind] = max(peak_by_kind.get(p.kind, 0), p.peak_rss)
    row = {
        "hospitals": n,
        "rounds": rounds,
        "partition": partition,
        "epsilon": epsilon,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(sampler.samples[-1].cpu if sampler.samples else 0.0, 1),
        "cpu_reaped_s": round(rusage.ru_utime + rusage.ru_stime, 1),
        "peak_rss_mib": round(sampler.peak("rss") / 2**20),
        "peak_pss_mib": round(sampler.peak("pss") / 2**20),
        "peak_uss_mib": round(sampler.peak("uss") / 2**20),
        "processes": len(sampler.procs),
        "max_processes_at_once": max((s.nprocs for s in sampler.samples), default=0),
        "peak_rss_one_process_mib": {k: round(v / 2**20) for k, v in sorted(peak_by_kind.items(), key=lambda kv: -kv[1])
                                     if v > 20 * 2**20},
        "load_after": os.getloadavg(),
    }
    if proc.returncode == 0 or (run_dir / "metrics.json").is_file():
        row.update(_outcome(run_dir))
    if proc.returncode != 0:
        row["log_tail"] = log_path.read_text()[-2000:]
    if keep is None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return row


def dispatch_sweep(n: int, repeats: int = 20) -> tuple[float, float]:
    """Seconds of one dispatch sweep over ``n`` nodes with one (delivered) message stored per node,
    mid-round: Flower 1.41's loop (``get_message_ins`` for every node) and fedrad's (one scan, then
    only the nodes with a message waiting)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedrad.server.engine import _pending_nodes

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=99)
    run.primary_task_id, run.federation_id = 5, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 99, 1
    state.run_ids[99] = RunRecord(run=run)
    state.task_store[5] = Task(task_id=5, run_id=99)
    mapping = _register_nodes(n, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    grid.push_messages([Message(RecordDict({"c": ConfigRecord({"k": 1})}), dst_node_id=nid, message_type="train")
                        for nid in mapping])
    for nid in mapping:  # delivered, replies not yet in: what the loop sees for most of a round
        state.get_message_ins(node_id=nid, limit=1)
    t = time.perf_counter()
    for _ in range(repeats):
        for nid in mapping:
            state.get_message_ins(node_id=nid, limit=1)
    flower = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        for nid in _pending_nodes(state, set(mapping)) or []:
            state.get_message_ins(node_id=nid, limit=1)
    fedrad = (time.perf_counter() - t) / repeats
    return flower, fedrad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hospitals", type=int, nargs="+", default=[10, 30, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partition", choices=["iid", "dirichlet"], default="iid")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period (s)")
    ap.add_argument("--timeout", type=float, default=1800, help="per row (s)")
    ap.add_argument("--keep", type=Path, help="keep every row's run folder under this folder")
    ap.add_argument("--json", type=Path, help="append the rows here (JSON lines)")
    ap.add_argument("--rev", help="run with the simulation-engine modules of this git revision (see demo_profile.py)")
    ap.add_argument("--dispatch-sweep", type=int, nargs="+", metavar="N",
                    help="only measure one message-dispatch sweep for N nodes (Flower's loop vs fedrad's)")
    args = ap.parse_args()
    if args.dispatch_sweep:
        print(f"load: {os.getloadavg()}\n| nodes | Flower sweep (ms) | share of a core at 0.1 s period | fedrad sweep (ms) |"
              "\n|---|---|---|---|")
        for n in args.dispatch_sweep:
            flower, fedrad = dispatch_sweep(n)
            print(f"| {n} | {flower * 1000:.1f} | {flower / (flower + 0.1) * 100:.0f} % | {fedrad * 1000:.2f} |")
        return 0
    modules = _revision_modules(args.rev) if args.rev else None
    print(f"load before: {os.getloadavg()}", flush=True)
    rows = []
    for n in args.hospitals:
        row = run_row(n, rounds=args.rounds, partition=args.partition, epsilon=args.epsilon, interval=args.interval,
                      keep=args.keep, timeout_s=args.timeout, modules=modules)
        row["engine"] = args.rev or "working tree"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| hospitals | images/hospital | trained | refused | failed | wall (s) | s/round | CPU (s) | "
          "peak RSS sum (MiB) | peak PSS sum (MiB) | peak USS sum (MiB) | processes | test AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_round = sum(r.get("round_seconds", [])) / max(1, len(r.get("round_seconds", [])))
        auc = r.get("test_auc")
        print(f"| {r['hospitals']} | ~{4708 // r['hospitals']} | {r.get('trained', '?')} | {r.get('refused', '?')} | "
              f"{r.get('failed', '?')} | {r['wall_s']} | {per_round:.1f} | {r['cpu_s']} | {r['peak_rss_mib']} | "
              f"{r['peak_pss_mib']} | {r['peak_uss_mib']} | {r['max_processes_at_once']} | "
              f"{'' if auc is None else f'{auc:.3f}'} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        k = b["hospitals"] / a["hospitals"]
        print(f"\n{a['hospitals']} -> {b['hospitals']} hospitals (x{k:g}): wall x{b['wall_s'] / a['wall_s']:.2f}, "
              f"CPU x{b['cpu_s'] / max(a['cpu_s'], 1e-9):.2f}, peak PSS x{b['peak_pss_mib'] / max(a['peak_pss_mib'], 1):.2f}")
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
