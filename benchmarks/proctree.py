"""Sample a process tree from /proc (Linux): CPU time and memory of a command and every process it
starts (Ray's gcs_server, raylet and workers included), without psutil.

Used by ``benchmarks/demo_profile.py`` and ``benchmarks/scaling.py`` (a benchmark helper, not a test).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


BOOT = _boot_time()


@dataclass
class ProcInfo:
    pid: int
    kind: str
    start: float  # wall clock (epoch seconds) the process started
    cpu: float = 0.0  # last seen user+sys seconds (own, not children's)
    first_seen: float = 0.0
    last_seen: float = 0.0
    peak_rss: int = 0


def _stat(pid: int) -> tuple[int, float, float, int] | None:
    """(ppid, cpu seconds, start epoch, rss bytes) from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # fields from index 3 (state) on: rest[0] = state, rest[1] = ppid, utime = 14th field -> rest[11]
    ppid = int(rest[1])
    cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK
    start = BOOT + int(rest[19]) / CLK_TCK
    rss = int(rest[21]) * PAGE
    return ppid, cpu, start, rss


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if not cmd.strip():
        try:
            cmd = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return "?"
    for key, name in (("ClientAppActor", "ray actor"), ("ray::IDLE", "ray idle worker"),
                      ("default_worker", "ray worker (starting)"), ("ray::", "ray worker"),
                      ("gcs_server", "ray gcs_server"), ("/raylet ", "raylet"), ("raylet/raylet", "raylet"),
                      ("dashboard", "ray dashboard/agent"), ("agent", "ray dashboard/agent"),
                      ("log_monitor", "ray log monitor"), ("monitor.py", "ray autoscaler monitor")):
        if key in cmd:
            return name
    return "other: " + cmd[:60]


def _smaps(pid: int) -> tuple[int, int]:
    """(PSS, USS) bytes from /proc/PID/smaps_rollup (0, 0 if unreadable)."""
    pss = uss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if parts[0] == "Pss:":
                pss = int(parts[1]) * 1024
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                uss += int(parts[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return pss, uss


@dataclass
class Sample:
    t: float
    cpu: float  # process-tree CPU seconds so far (dead processes keep their last value)
    rss: int
    pss: int
    uss: int
    nprocs: int
    cpu_by_kind: dict[str, float] = field(default_factory=dict)


class TreeSampler:
    """Samples the tree under ``root`` every ``interval`` seconds in a thread (``start``/``stop``).

    CPU of a process that exits between two samples loses at most one interval's worth; the
    reaped total (``os.wait4``'s rusage) is the exact cross-check."""

    def __init__(self, root: int, *, interval: float = 0.2, smaps: bool = True) -> None:
        self.root = root
        self.interval = interval
        self.smaps = smaps
        self.procs: dict[tuple[int, float], ProcInfo] = {}
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> dict[int, tuple[int, float, float, int]]:
        stats: dict[int, tuple[int, float, float, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st is not None:
                    stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, st in stats.items():
            children.setdefault(st[0], []).append(pid)
        out, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                out[pid] = stats[pid]
            todo.extend(children.get(pid, []))
        return out

    def sample_once(self) -> Sample:
        now = time.time()
        tree = self._tree()
        rss = pss = uss = 0
        for pid, (_, cpu, start, r) in tree.items():
            key = (pid, start)
            info = self.procs.get(key)
            if info is None:
                info = self.procs[key] = ProcInfo(pid=pid, kind=_kind(pid, self.root), start=start, first_seen=now)
            elif info.kind.startswith(("ray worker", "ray idle", "other", "?")):  # a worker's title changes once it hosts an actor
                info.kind = _kind(pid, self.root)
            info.cpu, info.last_seen = cpu, now
            info.peak_rss = max(info.peak_rss, r)
            rss += r
            if self.smaps:
                p, u = _smaps(pid)
                pss, uss = pss + p, uss + u
        by_kind: dict[str, float] = {}
        for info in self.procs.values():
            by_kind[info.kind] = by_kind.get(info.kind, 0.0) + info.cpu
        s = Sample(t=now, cpu=sum(by_kind.values()), rss=rss, pss=pss, uss=uss, nprocs=len(tree), cpu_by_kind=by_kind)
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)
        self.sample_once()

    def at(self, t: float) -> Sample | None:
        """The last sample taken at or before ``t`` (None before the first)."""
        best = None
        for s in self.samples:
            if s.t <= t:
                best = s
            else:
                break
        return best

    def cpu_between(self, a: float, b: float) -> float:
        sa, sb = self.at(a), self.at(b)
        return (sb.cpu if sb else 0.0) - (sa.cpu if sa else 0.0)

    def kind_cpu_between(self, a: float, b: float) -> dict[str, float]:
        sa, sb = self.at(a), self.at(b)
        if sb is None:
            return {}
        base = sa.cpu_by_kind if sa else {}
        return {k: v - base.get(k, 0.0) for k, v in sb.cpu_by_kind.items() if v - base.get(k, 0.0) > 0.005}

    def peak(self, attr: str) -> int:
        return max((getattr(s, attr) for s in self.samples), default=0)
