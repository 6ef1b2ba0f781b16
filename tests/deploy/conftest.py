"""Helpers for deployment tests: free loopback ports, processes that are always stopped by PID, and
provisioning the way a real federation does it (each hospital makes its own key; the coordinator
receives public keys only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (Flower starts some helpers in sessions of their own)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


class Procs:
    """Starts commands in their own process groups; :meth:`stop_all` ends each group and stray child."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.known: set[int] = set()

    def start(self, name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=self.root)
        log.close()
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def remember_children(self) -> None:
        self.known |= _children({p.pid for p in self.started.values() if p.poll() is None})

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.started[name]
        kids = _children({proc.pid})
        self.known |= kids
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return proc.returncode

    def stop_all(self) -> None:
        self.remember_children()
        for name in reversed(list(self.started)):
            try:
                self.stop(name, timeout=15)
            except Exception:  # noqa: BLE001,S110 - keep stopping the others whatever happens
                pass
        for pid in self.known:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Processes stopped by PID at teardown, also when pytest itself is sent SIGTERM (e.g. by `timeout`)."""
    p = Procs(tmp_path)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield p
    finally:
        p.stop_all()
        signal.signal(signal.SIGTERM, previous)


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def hospital_keygen(root: Path, name: str) -> Path:
    """Hospital ``name`` makes its key pair on "its machine" (``root/hospital-keys/NAME``); returns the PUBLIC key."""
    from fedrad.client.runtime.node_keys import generate

    return generate(root / "hospital-keys" / name, comment=name).public_path


def install_hospital_key(root: Path, kit: Path, name: str) -> None:
    """The hospital puts its own private key beside the kit's node.yaml (as its operator would)."""
    from fedrad.common.keyfiles import write_private

    write_private(kit / "node-auth.key", (root / "hospital-keys" / name / "node-auth.key").read_bytes())


def provision_federation(fed_yaml: Path, out: Path, *, keys_root: Path | None = None) -> list[str]:
    """Provision ``fed_yaml`` into ``out`` with the real key flow: every hospital runs keygen on its side,
    the coordinator provisions with the PUBLIC keys only, then each hospital installs its private key in
    its kit (``out/nodes/NAME/node-auth.key``). Returns the hospitals issued."""
    from fedrad.server.provision import Provisioner, load_federation

    cfg = load_federation(fed_yaml)
    root = keys_root or out.parent
    public = {n: hospital_keygen(root, n) for n in cfg.names}
    issued = Provisioner(out).provision(cfg, public_keys=public)
    for n in cfg.names:
        install_hospital_key(root, out / "nodes" / n, n)
    return issued
