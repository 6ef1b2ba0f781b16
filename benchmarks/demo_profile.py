"""Where the demo's time goes: run ``fedrad simulate`` (the README's command, the bundled demo) in a
temporary run folder and print a per-phase table of wall time and process-tree CPU time (a benchmark,
not a test).

Phase boundaries come from the run itself: the time each progress line reached stdout, the audit
log's time of every hospital reply, the run folder's file times (checkpoints, models, plots,
report), and the start time of every process in the tree (Ray's gcs_server, raylet, workers). CPU
time is the sum over the process tree, sampled from /proc every 0.1 s (see ``proctree.py``).
Usage::

    python benchmarks/demo_profile.py [--runs 2] [--keep DIR] [--json out.json] [-- extra simulate args]
    python benchmarks/demo_profile.py --ab HEAD~1 --runs 3   # A/B: the given revision of the engine files vs now

``--ab REV`` alternates runs of the working tree with runs in which the simulation-engine modules
(``server/engine.py``, ``server/simulation.py``, ``server/cmd_simulate.py``, ``server/progress.py``) are
taken from git revision REV (everything else as checked out), so a before/after comparison shares
the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proctree import TreeSampler

FEDRAD = Path(sys.executable).parent / "fedrad"
REPO = Path(__file__).resolve().parent.parent
#: The modules ``--ab`` takes from another revision.
AB_MODULES = ("engine", "simulation", "cmd_simulate", "progress")
#: Runs the fedrad CLI with some ``fedrad.server`` modules loaded from other files (argv[1]: folder).
SHIM = """
import importlib.util, sys
from pathlib import Path
folder = Path(sys.argv.pop(1))
for path in sorted(folder.glob("*.py")):
    name = "fedrad.server." + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
from fedrad.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _revision_modules(rev: str) -> Path:
    """A folder with ``AB_MODULES`` as they were at git revision ``rev``."""
    folder = Path(tempfile.mkdtemp(prefix=f"fedrad-rev-{rev.replace('/', '_')}-"))
    for name in AB_MODULES:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:server/{name}.py"], capture_output=True,
                             text=True, check=True).stdout
        (folder / f"{name}.py").write_text(src)
    return folder
ROUND_LINE = re.compile(r"^round (\d+) \(")


def _audit_times(run_dir: Path) -> dict[str, list[tuple[float, str, int]]]:
    """site -> [(time, kind, node round)] of every reply it recorded."""
    out: dict[str, list[tuple[float, str, int]]] = {}
    for path in sorted((run_dir / "sites").glob("*/audit.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            d = json.loads(line)
            rows.append((float(d["time"]), str(d["kind"]), int(d.get("round", 0))))
        out[path.parent.name] = rows
    return out


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def profile_once(extra: list[str], keep: Path | None, modules: Path | None = None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fedrad-profile-"))
    run_dir = (keep or tmp) / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    lines: list[tuple[float, str]] = []
    t_launch = time.time()
    cmd = [str(FEDRAD)] if modules is None else [sys.executable, "-c", SHIM, str(modules)]
    proc = subprocess.Popen([*cmd, "simulate", "--out", str(run_dir), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=tmp, text=True, bufsize=1)
    sampler = TreeSampler(proc.pid, interval=0.1, smaps=False).start()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    t_exit = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    sampler.stop()
    if proc.returncode != 0:
        sys.stdout.write("\n".join(text for _, text in lines[-40:]) + "\n")
        raise SystemExit(f"fedrad simulate exited with {proc.returncode}")

    def first(pred: Any) -> float:
        for t, text in lines:
            if pred(text):
                return t
        raise SystemExit(f"no such line in the output: {pred}")

    t_study = first(lambda s: s.startswith(("study ", "resuming ")))
    t_started = first(lambda s: bool(re.search(r": \d+ hospitals, rounds", s)))
    rounds = {int(m.group(1)): t for t, s in lines if (m := ROUND_LINE.match(s))}
    last = max(rounds)
    t_tables = first(lambda s: "per round (federation)" in s)
    t_done = first(lambda s: s.startswith(("completed in", "stopped")))
    audit = _audit_times(run_dir)
    first_train = sorted(min(t for t, k, _ in rows if k == "train") for rows in audit.values())
    r1_train_done = max(max(t for t, k, r in rows if k == "train" and r == 1) for rows in audit.values())
    r1_eval_done = max(max(t for t, k, r in rows if k == "evaluate" and r == 1) for rows in audit.values())
    t_last_model = _mtime(run_dir / "last-model.pt")
    t_model = _mtime(run_dir / "model.pt")
    t_plots = max(filter(None, (_mtime(run_dir / f) for f in ("loss.png", "epsilon.png", "metrics.png"))))
    t_report = _mtime(run_dir / "report.html")
    ray = {p.kind: p.start for p in sorted(sampler.procs.values(), key=lambda p: -p.start)}  # earliest per kind
    actor_starts = sorted(p.start for p in sampler.procs.values() if p.kind == "ray actor")

    def phase(name: str, a: float, b: float) -> dict[str, Any]:
        return {"phase": name, "start": a - t_launch, "wall": b - a, "cpu": sampler.cpu_between(a, b),
                "by_kind": sampler.kind_cpu_between(a, b)}

    phases = [
        phase("CLI start, study check, run folder", t_launch, t_study),
        phase("ServerApp: prepare study (npz, model) -> study_started", t_study, t_started),
        phase("round 1 until the first hospital's train reply (engine, actors, imports, data, training)",
              t_started, first_train[0]),
        phase("round 1: remaining train replies", first_train[0], r1_train_done),
        phase("round 1: aggregation + evaluate round + test eval + checkpoint", r1_train_done, rounds[1]),
    ]
    if last > 1:
        phases.append(phase(f"rounds 2..{last} (total)", rounds[1], rounds[last]))
    phases += [
        phase("finish: last-model.pt", rounds[last], t_last_model or rounds[last]),
        phase("finish: final test evaluation, model.pt", t_last_model or rounds[last], t_model or rounds[last]),
        phase("finish: plots", t_model or rounds[last], t_plots),
        phase("finish: governance + report.html", t_plots, t_report or t_plots),
        phase("engine shutdown (Ray) until tables print", t_report or t_plots, t_tables),
        phase("tables, summary, interpreter exit", t_tables, t_exit),
    ]
    milestones = {
        "study line": t_study - t_launch,
        "study_started line": t_started - t_launch,
        **{f"first {k} process start": v - t_launch for k, v in ray.items() if k != "driver"},
        **{f"actor {i + 1} process start": v - t_launch for i, v in enumerate(actor_starts)},
        **{f"site {i + 1} first train reply": v - t_launch for i, v in enumerate(first_train)},
        "round 1 train replies all in": r1_train_done - t_launch,
        "round 1 evaluate replies all in": r1_eval_done - t_launch,
        **{f"round {n} line": t - t_launch for n, t in sorted(rounds.items())},
        "done line": t_done - t_launch,
        "exit": t_exit - t_launch,
    }
    by_kind_total: dict[str, float] = {}
    for p in sampler.procs.values():
        by_kind_total[p.kind] = by_kind_total.get(p.kind, 0.0) + p.cpu
    result = {
        "wall": t_exit - t_launch,
        "cpu_sampled": sampler.samples[-1].cpu if sampler.samples else 0.0,
        "cpu_reaped": rusage.ru_utime + rusage.ru_stime,
        "processes": len(sampler.procs),
        "processes_by_kind": {k: sum(1 for p in sampler.procs.values() if p.kind == k) for k in by_kind_total},
        "cpu_by_kind": by_kind_total,
        "peak_rss_sum": sampler.peak("rss"),
        "phases": phases,
        "milestones": milestones,
        "round_seconds": {n: rounds[n] - rounds.get(n - 1, t_started) for n in sorted(rounds)},
        "final_line": next((s for _, s in reversed(lines) if s.startswith(("completed", "stopped"))), ""),
    }
    if keep is None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"\nwall {result['wall']:.1f} s, process-tree CPU {result['cpu_sampled']:.1f} s sampled "
          f"({result['cpu_reaped']:.1f} s reaped), {result['processes']} processes, "
          f"peak RSS sum {result['peak_rss_sum'] / 2**20:.0f} MiB")
    print("\n| phase | starts at (s) | wall (s) | CPU (s) | CPU by process kind |\n|---|---|---|---|---|")
    for p in result["phases"]:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p["by_kind"].items(), key=lambda kv: -kv[1]) if v >= 0.1)
        print(f"| {p['phase']} | {p['start']:.1f} | {p['wall']:.2f} | {p['cpu']:.2f} | {kinds} |")
    print("\n| milestone | seconds after launch |\n|---|---|")
    for k, v in result["milestones"].items():
        print(f"| {k} | {v:.2f} |")
    print("\nCPU by process kind (whole run): " + ", ".join(
        f"{k} {v:.1f} s ({result['processes_by_kind'][k]})" for k, v in sorted(result["cpu_by_kind"].items(),
                                                                              key=lambda kv: -kv[1])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="keep the run folder here (one run)")
    ap.add_argument("--json", type=Path, help="write every run's result here")
    ap.add_argument("--ab", metavar="REV", help="alternate runs with the engine modules of git revision REV")
    ap.add_argument("--quiet", action="store_true", help="only the summary lines")
    ap.add_argument("extra", nargs="*", help="extra arguments for fedrad simulate (after --)")
    args = ap.parse_args()
    print(f"load before: {os.getloadavg()}")
    variants: list[tuple[str, Path | None]] = [("now", None)]
    if args.ab:
        variants = [(args.ab, _revision_modules(args.ab)), ("now", None)]
    results = []
    for i in range(args.runs):
        for label, modules in variants:
            r = profile_once(args.extra, args.keep, modules)
            r["variant"], r["load"] = label, os.getloadavg()
            print(f"\n### run {i + 1}, {label}: wall {r['wall']:.1f} s, CPU {r['cpu_sampled']:.1f} s, "
                  f"load {r['load'][0]:.2f}")
            if not args.quiet:
                _print(r)
            results.append(r)
    print(f"\nload after: {os.getloadavg()}")
    for label, _ in variants:
        mine = [r for r in results if r["variant"] == label]
        print(f"{label}: walls " + ", ".join(f"{r['wall']:.1f}" for r in mine) + "; CPU " +
              ", ".join(f"{r['cpu_sampled']:.1f}" for r in mine) + "; round 1 " +
              ", ".join(f"{r['round_seconds'][1]:.1f}" for r in mine))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
