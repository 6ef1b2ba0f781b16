"""Per-round overhead of a real deployment on loopback (TLS, node authentication).

Starts ``fedrad coordinator start`` and N ``fedrad-node start`` hospitals on 127.0.0.1 (each
hospital makes its own key pair; the coordinator provisions with the public keys), submits a study
with ``fedrad run`` and reads the run folder and the processes' logs. Per round:

* ``round wall``: time between consecutive round checkpoints (train + both polls + evaluation
  messages + the process each message starts on each node);
* ``compute``: the slowest hospital's DP training + evaluation compute in that round (from the
  node's task log lines; train replies no longer carry timings);
* ``overhead`` = round wall - compute (round 1 has no previous checkpoint: not counted);
* the overhead's components: on the nodes, the fedrad work around the compute (ledger, audit,
  model load, checks, encoding) and the task process's time before fedrad runs (fork of the warm
  runtime, pulling and decoding the message); on the coordinator (``metrics.json``
  ``coordinator_seconds``) configure (copy of the global arrays), screening (decoding and checking
  the replies), aggregation, checkpoint, test evaluation and best model; the rest is transfers
  through the object store and polling waits. Serialisation of the model is measured apart
  (``ArrayRecord`` to bytes and back, float32 and float16), and the bytes per round are counted.

Settings compared (``--settings``; ``flower`` and ``polls`` turn the node's warm runtime off):

* ``flower``: Flower 1.41's defaults: SuperNode polls every 3 s, SuperExec every 1 s, the
  ServerApp's Grid checks for replies every 3 s, object pulls retry after 1 s doubling to 10 s;
* ``polls``: SuperNode 0.25 s (``poll_interval_s`` in node.yaml), SuperExec 0.2 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), ServerApp Grid 0.25 s (``fedrad run --poll-interval``);
  each message still starts a cold ``flwr-clientapp`` process (``warm_runtime: false``); Flower's
  object-pull waits, as in ``flower``;
* ``tuned``: the same polls, and each message's process is forked from the node's warm runtime
  (``warm_runtime: true``, the default: torch, Opacus and fedrad imported once per node); the
  evaluation of each round's model rides in the next round's train message (issue 14); pulls
  of objects still being uploaded retry after 0.05-0.5 s and the SuperNode holds its task
  process's pulls until the objects arrive (the default since issue 14, ``FEDRAD_QUICK_PULLS``);
  the SuperLink keeps message objects in memory, not in its SQLite database (the default since
  issue 14, ``FEDRAD_SUPERLINK_OBJECT_STORE``);
* ``tuned-flower-pulls``: ``tuned`` with Flower's object-pull waits (1 s doubling to 10 s;
  ``FEDRAD_QUICK_PULLS=0`` for the nodes and the coordinator);
* ``tuned-sql-objects``: ``tuned`` with the SuperLink's objects in its SQLite database
  (``FEDRAD_SUPERLINK_OBJECT_STORE=database``, Flower's behaviour with ``--database``);
* ``tuned-before``: both of the above: ``tuned`` as it was before those two changes;
* ``tuned-separate``: ``tuned`` with the flow before issue 14 (one evaluate message per round:
  ``FEDRAD_SEPARATE_EVALUATE=1`` in the coordinator's environment), for a side-by-side "before";
* ``tuned-f16``: ``tuned`` with ``federation.update_encoding: float16-delta``;
* ``tuned-prev``: ``tuned`` as it was before the "deploy2" session (issue 14): float32 updates, the
  coordinator's SuperExec polling every 0.2 s, the SuperLink's SQLite and middleware tuning off and
  ``fedrad run`` asking a ``flwr`` process per run listing, the SuperNode checking for its task's reply
  objects every 0.25 s, not 0.05 s (:data:`PREV_ENV`),
  for a side-by-side "before"; ``tuned-f32``: ``tuned`` with float32 updates; ``tuned-unpacked``:
  ``tuned`` with the model sent array by array instead of packed into one (``FEDRAD_PACKED_MODELS=0``).

Every process's CPU seconds (it and all its descendants, from /proc) are sampled every 0.25 s and
reported per round and role (SuperLink, gateway, ServerApp, SuperNodes, warm-runtime tasks...);
``--profile PY_SPY`` also records py-spy stacks of the coordinator's and one hospital's processes.

Every process is started in its own process group and stopped by PID, whatever happens.

    python benchmarks/deploy_overhead.py --model resnet18 --rounds 4 --settings tuned-separate tuned tuned-f16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / "fedrad" / "data" / "pneumoniamnist.npz"
BIN = Path(sys.executable).parent
_TUNED = {"node_poll": 0.25, "superexec_poll": "0.2", "grid_poll": 0.25, "warm": True}
#: This session's (issue 14, "deploy2") defaults on top: the coordinator's SuperExec checks for
#: studies to start every 1 s (``fedrad coordinator start --poll-interval``), updates as float16 deltas.
_NOW = {**_TUNED, "coordinator_poll": "1.0", "encoding": "float16-delta"}
SETTINGS: dict[str, dict[str, Any]] = {
    "flower": {"node_poll": None, "superexec_poll": "1.0", "grid_poll": 0.0, "warm": False, "flower_pulls": True},
    "polls": {"node_poll": 0.25, "superexec_poll": "0.2", "grid_poll": 0.25, "warm": False, "flower_pulls": True},
    "tuned": dict(_NOW),
    "tuned-f32": {**_NOW, "encoding": None},
    "tuned-unpacked": {**_NOW, "unpacked": True},
    "tuned-flower-pulls": {**_TUNED, "flower_pulls": True},
    "tuned-sql-objects": {**_TUNED, "sql_objects": True},
    "tuned-before": {**_TUNED, "flower_pulls": True, "sql_objects": True},
    "tuned-separate": {**_TUNED, "separate_evaluate": True},
    "tuned-f16": {**_TUNED, "encoding": "float16-delta"},
    # before the "deploy2" session the SuperNode's poll setting did nothing (its clock kept time.sleep):
    # it polled every 3 s and checked for its own task every 0.5 s, Flower's defaults
    "tuned-prev": {**_TUNED, "node_poll": None, "prev": True},
}
#: Environment that switches this session's (issue 14, "deploy2") changes off, for ``tuned-prev``.
PREV_ENV = {"FEDRAD_SUPERLINK_SQL_TUNING": "0", "FEDRAD_CONTROL_IN_PROCESS": "0", "FEDRAD_QUICK_LOCAL_WAITS": "0",
            "FEDRAD_PACKED_MODELS": "0"}
#: The node's line per task (fedrad.client.runtime.app): time in fedrad, compute, task process age.
TASK_LINE = re.compile(r"(?P<kind>train|evaluate) task \((?:warm|cold) start\): (?P<fedrad>[\d.]+)s in fedrad "
                       r"\(train (?P<train>[\d.]+)s(?:, evaluate (?P<eval>[\d.]+)s)?\), (?P<age>[\d.]+)s since")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Process roles, from the command line (first match wins); forked warm tasks share the warm
#: runtime's command line and are told apart by not being the runtime itself (:func:`_role`).
ROLES = (("fedrad.server.coordinator", "superlink"), ("fedrad.server.fleet_gateway", "gateway"),
         ("flwr-serverapp", "serverapp"), ("fedrad.client.runtime.warm", "warm"),
         ("fedrad.client.runtime.node", "supernode"), ("fedrad.client.commands.node", "supernode"), ("flwr-clientapp", "clientapp-shim"),
         ("flower-superexec", "superexec"), ("coordinator start", "coordinator-cli"),
         ("fedrad-node start", "node-cli"), ("fedrad run", "run-cli"), ("bin/flwr ", "flwr-cli"), ("py-spy", "py-spy"))
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, session id, CPU seconds user+system of the process itself) from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / _TICKS


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuSampler:
    """Samples /proc every ``interval`` s: CPU seconds of every process Group started and of all their
    descendants, by pid, with its role and the name of the process it descends from. ``series`` holds (wall time, {pid: cpu s}) samples."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.sessions = interval, {}  # type: ignore[var-annotated]
        self.info: dict[int, tuple[str, str]] = {}  # pid -> (session name, role)
        self.series: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, name: str, pid: int) -> None:
        self.sessions[pid] = name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _role(self, pid: int, ppid: int) -> str:
        cmd = _cmdline(pid)
        for needle, role in ROLES:
            if needle in cmd:
                if role == "warm":
                    parent = _cmdline(ppid)
                    if "fedrad.client.runtime.warm" in parent:
                        grand = _proc_stat(ppid)
                        return "warm-task" if grand and "fedrad.client.runtime.warm" in _cmdline(grand[0]) \
                            else "warm-waiter"
                return role
        return cmd.split(" ")[1].rsplit("/", 1)[-1] if " " in cmd else (cmd or "?")

    def _session_of(self, pid: int, stats: dict[int, tuple[int, int, float]], owner: dict[int, str]) -> str | None:
        """The name of the started process ``pid`` descends from (or is), None if none."""
        seen = 0
        while pid in stats and seen < 16:
            if pid in self.sessions:
                return str(self.sessions[pid])
            if pid in owner:
                return owner[pid]
            pid, seen = stats[pid][0], seen + 1
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            now, cpu, stats = time.time(), {}, {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
                    stats[int(entry.name)] = st
            owner: dict[int, str] = {}  # every descendant of a started process (Flower starts some in new sessions)
            for pid in stats:
                name = self._session_of(pid, stats, owner)
                if name is not None:
                    owner[pid] = name

            for pid, st in stats.items():
                name = owner.get(pid)
                if name is None:
                    continue
                if pid not in self.info:
                    self.info[pid] = (name, self._role(pid, st[0]))
                cpu[pid] = st[2]
            self.series.append((now, cpu))
            self._stop.wait(self.interval)

    def per_window(self, edges: list[float]) -> list[dict[str, float]]:
        """CPU seconds per (session name, role) between consecutive wall-clock ``edges``; a process's
        CPU is its last sample before each edge (0 before it appeared)."""
        out = []
        for a, b in zip(edges, edges[1:]):
            before = self._at(a)
            after = self._at(b)
            row: dict[str, float] = {}
            for pid, c in after.items():
                session, role = self.info[pid]
                key = f"{session}/{role}"
                row[key] = row.get(key, 0.0) + c - before.get(pid, 0.0)
            out.append({k: round(v, 2) for k, v in sorted(row.items())})
        return out

    def timeline(self, step: float = 1.0) -> list[dict[str, Any]]:
        """CPU seconds per role (all sessions together) in consecutive ``step``-second windows."""
        if not self.series:
            return []
        t0, t1 = self.series[0][0], self.series[-1][0]
        edges = [t0 + i * step for i in range(int((t1 - t0) / step) + 1)]
        out = []
        for edge, row in zip(edges, self.per_window(edges)):
            roles: dict[str, float] = {}
            for key, v in row.items():
                role = key.split("/", 1)[1]
                roles[role] = round(roles.get(role, 0.0) + v, 2)
            out.append({"t": round(edge, 2), **{k: v for k, v in roles.items() if v > 0}})
        return out

    def _at(self, t: float) -> dict[int, float]:
        last: dict[int, float] = {}
        for when, cpu in self.series:
            if when > t:
                break
            last.update(cpu)
        return last


class Group:
    def __init__(self, root: Path, sampler: CpuSampler | None = None) -> None:
        self.root, self.procs = root, []  # type: ignore[var-annotated]
        self.sampler = sampler

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **env}, cwd=self.root)
        self.procs.append(p)
        if self.sampler is not None:
            self.sampler.add(name, p.pid)
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
    env = {"OMP_NUM_THREADS": str(args.threads), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": s["superexec_poll"],
           "COLUMNS": "200", **({"FEDRAD_QUICK_PULLS": "0"} if s.get("flower_pulls") else {})}
    for h in hospitals:  # each hospital makes its own key pair; the coordinator gets the public key only
        subprocess.run([str(BIN / "fedrad-node"), "keygen", "--out", str(root / "keys" / h), "--comment", h],
                       check=True, capture_output=True, env={**os.environ, **env})
    (root / "federation.yaml").write_text(yaml.safe_dump(
        {"name": "bench", "hospitals": [{"name": h, "public_key": f"keys/{h}/node-auth.pub"} for h in hospitals],
         "superlink": {"address": "127.0.0.1", "port": port}}))
    subprocess.run([str(BIN / "fedrad"), "provision", "--config", str(root / "federation.yaml"), "--out",
                    str(root / "prov")], check=True, capture_output=True, env={**os.environ, **env}, cwd=root)
    for h in hospitals:
        key = root / "prov" / "nodes" / h / "node-auth.key"
        shutil.copyfile(root / "keys" / h / "node-auth.key", key)
        key.chmod(0o600)
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
        **({"federation": {"name": "bench", "num_hospitals": args.hospitals, "rounds": args.rounds,
                           "min_hospitals": args.hospitals, "round_timeout_s": 1800,
                           "update_encoding": s["encoding"]}} if s.get("encoding") else {}),
    }))
    sampler = CpuSampler()
    sampler.start()
    group = Group(root, sampler)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        if s.get("prev"):
            env = {**env, **PREV_ENV}
        coord_env = {**env, **({"FEDRAD_SEPARATE_EVALUATE": "1"} if s.get("separate_evaluate") else {}),
                     **({"FEDRAD_SUPERLINK_OBJECT_STORE": "database"} if s.get("sql_objects") else {}),
                     **({"FEDRAD_PACKED_MODELS": "0"} if s.get("unpacked") else {})}
        if s.get("coordinator_poll"):  # the coordinator's own SuperExec poll, not the nodes'
            coord_env = {k: v for k, v in coord_env.items() if k != "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"}
        group.start("coordinator", [str(BIN / "fedrad"), "coordinator", "start", "--prov", str(root / "prov"),
                                    "--host", "127.0.0.1", "--poll-interval",
                                    s.get("coordinator_poll") or s["superexec_poll"]], coord_env)
        deadline = time.monotonic() + 120
        while "registered hospitals:" not in (root / "coordinator.log").read_text(errors="replace"):
            if time.monotonic() > deadline or group.procs[0].poll() is not None:
                raise RuntimeError((root / "coordinator.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        for h in hospitals:
            group.start(h, [str(BIN / "fedrad-node"), "start", "--config", str(root / "prov" / "nodes" / h / "node.yaml")],
                        env)
        if args.profile:  # py-spy on the coordinator's and the first hospital's process trees
            for proc, who in ((group.procs[0], "coordinator"), (group.procs[1], hospitals[0])):
                spies.append(subprocess.Popen(
                    [args.profile, "record", "--pid", str(proc.pid), "--subprocesses", "--nonblocking",
                     "--rate", "20", "--format", "raw", "--output", str(root / f"profile-{who}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
                sampler.add("py-spy", spies[-1].pid)
        run_dir = root / "run"
        t0 = time.monotonic()
        follower = subprocess.Popen([str(BIN / "fedrad"), "run", "--prov", str(root / "prov"), "--config", str(study),
                                     "--out", str(run_dir), "--wait", "300", "--poll-interval", str(s["grid_poll"])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, **coord_env}, start_new_session=True)
        sampler.add("fedrad-run", follower.pid)  # the operator's `fedrad run`, following the study
        try:
            stdout, stderr = follower.communicate(timeout=3600)
        except subprocess.TimeoutExpired:
            os.killpg(follower.pid, signal.SIGKILL)
            raise
        out = subprocess.CompletedProcess(follower.args, follower.returncode, stdout, stderr)
        (root / "run.log").write_text(out.stdout + out.stderr)
        total = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    finally:
        for spy in spies:  # py-spy writes its profile when its target exits or on SIGINT
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
        group.stop()
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        sampler.stop()
    result = {"setting": name, **s, **analyse(root, hospitals, separate=bool(s.get("separate_evaluate"))),
              "total_s": total}
    ckpt = sorted((int(p.stem.split("-")[1]), p.stat().st_mtime) for p in (run_dir / "checkpoints").glob("round-*.pt"))
    result["cpu_per_round_s"] = dict(zip([f"round {n}" for n, _ in ckpt[1:]],
                                         sampler.per_window([t for _, t in ckpt])))
    result["cpu_whole_run_s"] = sampler.per_window([sampler.series[0][0], sampler.series[-1][0]])[0]
    result["hops_s"] = hops(root, hospitals, dict(ckpt))
    (root / "cpu.json").write_text(json.dumps({"per_round": result["cpu_per_round_s"],
                                               "whole_run": result["cpu_whole_run_s"],
                                               "timeline": sampler.timeline(),
                                               "processes": {str(k): v for k, v in sampler.info.items()}}, indent=1))
    return result


_STAMP = r"^(?P<t>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO "
#: Time-stamped node log lines that mark a message's hops (the SuperNode's own since issue 14).
HOP_LINES = {"task_process": re.compile(_STAMP + r"flwr: Start `flwr-clientapp` process", re.MULTILINE),
             "node_has_objects": re.compile(r"message received from the coordinator in [\d.]+s \((?P<t>[^)]+)\)"),
             "task_has_input": re.compile(_STAMP + r"\S+: app \S+ approved on this node", re.MULTILINE),
             "task_done": re.compile(_STAMP + r"\S+: (?:train|evaluate) task \(", re.MULTILINE),
             "reply_sent": re.compile(r"reply sent to the coordinator in [\d.]+s \((?P<t>[^)]+)\)")}


def _stamp(text: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def hops(root: Path, hospitals: list[str], checkpoints: dict[int, float]) -> list[dict[str, Any]]:
    """Per round (from round 2) and per hospital's first message of the round: seconds between the
    previous checkpoint, the task process's start (the node has the message's listing), the node
    holding all its objects, the task holding the message, the task's end, the reply sent, and the
    round's checkpoint (the slowest hospital's value per hop)."""
    per_node = {}
    for h in hospitals:
        text = (root / f"{h}.log").read_text(errors="replace")
        per_node[h] = {k: [_stamp(m["t"]) for m in rx.finditer(text)] for k, rx in HOP_LINES.items()}
    rows = []
    for n in sorted(checkpoints):
        if n - 1 not in checkpoints:
            continue
        start, end = checkpoints[n - 1], checkpoints[n]
        row: dict[str, Any] = {"round": n}
        for h, marks in per_node.items():
            first = {k: next((t for t in v if start < t <= end), None) for k, v in marks.items()}
            seq = [("checkpoint -> task process started (coordinator, push, polls)", start, first["task_process"]),
                   ("-> node has all objects (SuperLink -> gateway -> SuperNode)", first["task_process"],
                    first["node_has_objects"]),
                   ("-> task has the message (SuperNode -> task)", first["node_has_objects"], first["task_has_input"]),
                   ("(task process started -> task has the message)", first["task_process"],
                    first["task_has_input"]),
                   ("-> task done (fedrad + compute)", first["task_has_input"], first["task_done"]),
                   ("-> reply sent (task -> SuperNode -> SuperLink)", first["task_done"], first["reply_sent"])]
            last_reply = first["reply_sent"]
            for label, a, b in seq:
                if a is not None and b is not None:
                    row[label] = max(row.get(label, 0.0), b - a)
            if last_reply is not None:
                row["last reply sent"] = max(row.get("last reply sent", 0.0), last_reply)
        if "last reply sent" in row:
            row["-> checkpoint (ServerApp pulls, screens, aggregates)"] = end - row.pop("last reply sent")
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def node_tasks(log_text: str) -> list[dict[str, Any]]:
    """The node's task lines, in order: kind, seconds in fedrad, train and evaluate compute, task age."""
    return [{"kind": m["kind"], "fedrad": float(m["fedrad"]), "train": float(m["train"]),
             "eval": float(m["eval"] or 0.0), "age": float(m["age"])} for m in TASK_LINE.finditer(log_text)]


def per_round_tasks(tasks: list[dict[str, Any]], rounds: int, *, separate: bool) -> dict[int, dict[str, float]]:
    """A hospital's tasks grouped by the round they belong to (the round's wall clock): its train
    task, and in the old flow the evaluate task after it; the final evaluate goes with the last round."""
    out: dict[int, dict[str, float]] = {}
    n = 0
    for t in tasks:
        if t["kind"] == "train":
            n += 1
        row = out.setdefault(max(1, min(n, rounds)), {"compute": 0.0, "node_fedrad": 0.0, "task_start": 0.0,
                                                      "train": 0.0, "eval": 0.0, "tasks": 0})
        compute = t["train"] + t["eval"]
        if t["kind"] == "evaluate":  # a plain evaluate task: its time in fedrad is mostly the evaluation
            row["eval"] += t["fedrad"]
            compute = t["fedrad"]
        else:
            row["train"] += t["train"]
            row["eval"] += t["eval"]
        row["compute"] += compute
        row["node_fedrad"] += t["fedrad"] - compute
        row["task_start"] += t["age"] - t["fedrad"]
        row["tasks"] += 1
    return out


def analyse(root: Path, hospitals: list[str], *, separate: bool) -> dict[str, Any]:
    run_dir = root / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = {int(p.stem.split("-")[1]): p.stat().st_mtime for p in (run_dir / "checkpoints").glob("round-*.pt")}
    rounds = len(metrics["rounds"])
    nodes = {h: per_round_tasks(node_tasks((root / f"{h}.log").read_text(errors="replace")), rounds,
                                separate=separate) for h in hospitals}
    rows = []
    for r in metrics["rounds"]:
        n = r["round"]
        per = [nodes[h].get(n, {}) for h in hospitals]
        slowest = max(per, key=lambda x: x.get("compute", 0.0) + x.get("node_fedrad", 0.0) + x.get("task_start", 0.0))
        wall = ckpt[n] - ckpt[n - 1] if n - 1 in ckpt else None
        coord = {k: float(v) for k, v in (r.get("coordinator_seconds") or {}).items()}
        node_part = slowest.get("compute", 0.0) + slowest.get("node_fedrad", 0.0) + slowest.get("task_start", 0.0)
        rows.append({
            "round": n, "round_wall_s": wall, "compute_s": slowest.get("compute", 0.0),
            "train_s": slowest.get("train", 0.0), "eval_s": slowest.get("eval", 0.0),
            "node_fedrad_s": slowest.get("node_fedrad", 0.0), "task_start_s": slowest.get("task_start", 0.0),
            "node_tasks": slowest.get("tasks", 0), "coordinator_s": coord, "coordinator_total_s": sum(coord.values()),
            "overhead_s": None if wall is None else wall - slowest.get("compute", 0.0),
            "transfer_and_polling_s": None if wall is None else wall - node_part - sum(coord.values()),
        })
    over = [r["overhead_s"] for r in rows if r["overhead_s"] is not None]

    def med(key: str) -> float | None:
        vals = [r[key] for r in rows if r["overhead_s"] is not None and r[key] is not None]
        return statistics.median(vals) if vals else None

    return {"rounds": rows, "overhead_median_s": statistics.median(over) if over else None,
            "components_median_s": {k: med(k) for k in ("compute_s", "train_s", "eval_s", "node_fedrad_s",
                                                        "task_start_s", "coordinator_total_s",
                                                        "transfer_and_polling_s")},
            "coordinator_median_s": {k: statistics.median(r["coordinator_s"].get(k, 0.0) for r in rows[1:] or rows)
                                     for k in sorted({k for r in rows for k in r["coordinator_s"]})}}


def serialisation(model_name: str) -> dict[str, float]:
    """Seconds to turn the model's state into an ArrayRecord's bytes and back; bytes per copy."""
    import torch
    from flwr.app import Array, ArrayRecord

    from fedrad.common.models import build_model

    model = build_model(model_name, in_channels=1, num_classes=2, image_size=28)
    state = model.state_dict()
    out: dict[str, float] = {}
    for label, conv in (("float32", lambda v: v.detach().numpy()),
                        ("float16", lambda v: v.detach().numpy().astype("float16"))):
        t = time.perf_counter()
        rec = ArrayRecord({k: Array(conv(v)) for k, v in state.items()})
        enc = time.perf_counter() - t
        t = time.perf_counter()
        _ = {k: torch.from_numpy(a.numpy()) for k, a in rec.items()}
        dec = time.perf_counter() - t
        out[f"{label}_encode_s"], out[f"{label}_decode_s"] = enc, dec
        out[f"{label}_mb"] = sum(len(a.data) for a in rec.values()) / 1e6
    return out


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
    ap.add_argument("--profile", metavar="PY_SPY", help="also record py-spy profiles (raw stacks) of the "
                    "coordinator's and the first hospital's processes with this py-spy executable")
    ap.add_argument("--analyse", type=Path, help="only analyse the settings' folders kept earlier under this folder")
    args = ap.parse_args()
    if args.analyse:
        return print_analysis(args)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "host": os.uname().nodename,
                               "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    results["import_s"] = {m: import_seconds(m) for m in ("torch", "flwr.clientapp", "fedrad.client.runtime.app")}
    results["serialisation"] = serialisation(args.model)
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
    ser = results["serialisation"]
    print(f"serialisation of the model: float32 {ser['float32_mb']:.1f} MB, encode {ser['float32_encode_s']:.2f}s, "
          f"decode {ser['float32_decode_s']:.2f}s; float16 {ser['float16_mb']:.1f} MB, encode "
          f"{ser['float16_encode_s']:.2f}s, decode {ser['float16_decode_s']:.2f}s")
    cols = ("round wall", "compute", "train", "eval", "node fedrad", "task start", "coordinator", "transfer+poll",
            "overhead")
    print(f"{'setting':15} {'round':>5} " + " ".join(f"{c:>13}" for c in cols))

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    for run in results["runs"]:
        for r in run["rounds"]:
            vals = (r["round_wall_s"], r["compute_s"], r["train_s"], r["eval_s"], r["node_fedrad_s"],
                    r["task_start_s"], r["coordinator_total_s"], r["transfer_and_polling_s"], r["overhead_s"])
            print(f"{run['setting']:15} {r['round']:>5} " + " ".join(f"{f(v):>13}" for v in vals))
        comp = run["components_median_s"]
        print(f"{run['setting']:15} median overhead {f(run['overhead_median_s'])}s/round (node fedrad "
              f"{f(comp['node_fedrad_s'])}, task start {f(comp['task_start_s'])}, coordinator "
              f"{f(comp['coordinator_total_s'])}, transfers+polling {f(comp['transfer_and_polling_s'])}); "
              f"coordinator parts " + ", ".join(f"{k} {v:.2f}" for k, v in run["coordinator_median_s"].items())
              + f"; total {run['total_s']:.0f}s")
        for row in run.get("hops_s", []):
            print(f"{run['setting']:15} hops, round {row['round']} (slowest hospital, s): "
                  + "; ".join(f"{k} {v}" for k, v in row.items() if k != "round"))
        print(f"{run['setting']:15} CPU seconds per round by process (session/role): ")
        for label, row in run["cpu_per_round_s"].items():
            print(f"    {label}: total {sum(row.values()):.1f}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                                          if v >= 0.05))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_analysis(args: argparse.Namespace) -> int:
    """Re-read kept runs (``--keep`` of an earlier call) and print their per-component table."""
    for name in args.settings:
        root = args.analyse / name
        if not (root / "run" / "metrics.json").is_file():
            print(f"{name}: no finished run under {root}")
            continue
        hospitals = sorted(p.stem for p in root.glob("hospital-*.log"))
        res = analyse(root, hospitals, separate=bool(SETTINGS[name].get("separate_evaluate")))
        print(f"{name}: median overhead {res['overhead_median_s']}; components {res['components_median_s']}; "
              f"coordinator {res['coordinator_median_s']}")
        for r in res["rounds"]:
            print("  ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                         if k != "coordinator_s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
