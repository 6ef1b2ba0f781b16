"""The node's warm task runtime: a ClientApp task starts in milliseconds, not seconds.

Flower 1.41 runs every message in a new ``flwr-clientapp`` process, which imports torch, Opacus,
Flower and fedrad again before it can even check the app: 3.4 s on an idle 2-core machine; with
three hospitals on one 2-core machine an evaluate message took 12-20 s from process start to reply
for about 1 s of evaluation (``benchmarks/deploy_overhead.py``, BENCHMARKS.md).

``fedrad-node start`` also starts this server (``python -m fedrad.client.runtime.warm --socket PATH``),
which imports those modules once and then forks a ready process for each task:

* the node's ``flwr-clientapp`` (the gate shim, :func:`fedrad.client.runtime.gate.write_shim`) connects to
  the server's Unix socket (mode 0600, in the node's state folder; the server also checks that the
  peer runs as the same user) and passes its stdin/stdout/stderr, arguments, environment and
  working directory;
* the server forks a *waiter*, which forks the *task*: the task takes over the shim's stdio,
  environment, arguments and folder and runs :func:`fedrad.client.runtime.gate.main`, exactly what a cold
  shim runs, the app-approval gate included (each task decides afresh, unpacks the approved bundle
  into its own private folder and checks it file by file; nothing of the gate's state is set up
  before the fork, and the task's exit handlers remove its private copy); torch's and NumPy's
  random generators are reseeded from the OS, so no two tasks share random state;
* the waiter sends the task's pid to the shim (which forwards SIGTERM/SIGINT/SIGHUP to it), then
  the task's exit status; if the shim goes away first, the waiter stops the task.

If the server cannot be reached the shim runs the task cold, as before (:func:`run_task`): the warm
runtime only ever saves time. This module imports only the standard library at the top, so the
shim stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: Environment variable naming the warm runtime's socket (set by ``fedrad-node start``).
WARM_SOCKET_ENV = "FEDRAD_WARM_SOCKET"
#: Set in a task's environment when the warm runtime started it.
WARM_TASK_ENV = "FEDRAD_WARM_TASK"
#: What a task runs: ``module:function`` taking the argument list, returning an exit code.
DEFAULT_ENTRY = "fedrad.client.runtime.gate:main"
#: Imported once by the server (every task would import them otherwise).
PRELOAD = (
    "torch",
    "opacus",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "fedrad.client.runtime.gate",
    "fedrad.client.runtime.node",
    "fedrad.client.runtime.app",
    "fedrad.client.runtime.secagg_app",
)
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 1 << 20
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------------------- paths
@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits a Unix socket address (108 bytes): via /proc/self/fd when long."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- shim side
def run_task(argv: Sequence[str]) -> int:
    """What the node's ``flwr-clientapp`` runs: the task through the warm runtime, else cold."""
    rc = run_via_warm_runtime(argv)
    if rc is None:
        from fedrad.client.runtime.gate import main

        return main(list(argv))
    return rc


def run_via_warm_runtime(argv: Sequence[str], *, socket_path: str | None = None) -> int | None:
    """Run one task in a process forked by the warm runtime; its exit code, or None if the runtime
    cannot be reached (nothing was started: the caller runs the task cold)."""
    path = socket_path or os.environ.get(WARM_SOCKET_ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(Path(path)) as address:
            sock.connect(address)
        payload = json.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(sock, [_HEADER.pack(len(payload))], [0, 1, 2])
        sock.sendall(payload)
        reader = sock.makefile("r", encoding="ascii")
        first = reader.readline().split()
    except OSError:
        sock.close()
        return None
    if len(first) != 2 or first[0] != "pid":
        sock.close()
        return None  # refused before any task started
    pid = int(first[1])

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in _SIGNALS:
        signal.signal(sig, forward)
    with sock, reader:  # the waiter's only other line: the task's exit status
        try:
            parts = reader.readline().split()
        except OSError:
            parts = []
    if len(parts) != 2 or parts[0] != "exit":
        return 1  # the runtime went away without the task's status
    code = int(parts[1])
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------------------- server side
def serve(socket_path: Path, *, preload: Sequence[str] = PRELOAD, entry: str = DEFAULT_ENTRY,
          ready: Path | None = None) -> int:
    """Import ``preload`` once, then fork a task per connection until SIGTERM/SIGINT."""
    started = time.monotonic()
    for name in preload:
        importlib.import_module(name)
    module_name, _, func_name = entry.partition(":")
    target = getattr(importlib.import_module(module_name), func_name)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with _addressable(socket_path) as address:
            listener.bind(address)
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    listener.listen(32)
    listener.settimeout(0.5)
    stop = {"flag": False}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    log.info("warm ClientApp runtime ready on %s (%d modules preloaded in %.1fs)", socket_path.name,
             len(preload), time.monotonic() - started)
    if ready is not None:
        ready.write_text(str(os.getpid()))
    waiters: set[int] = set()
    parent = os.getppid()
    try:
        while not stop["flag"]:
            _reap(waiters)
            if os.getppid() != parent:  # fedrad-node start died without stopping us
                log.warning("warm ClientApp runtime: the node process is gone; stopping")
                break
            try:
                conn, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            pid = os.fork()
            if pid == 0:  # the waiter
                code = 1
                try:
                    listener.close()
                    code = _waiter(conn, target)
                except BaseException:  # never return into the server loop
                    log.exception("warm runtime: task could not be started")
                finally:
                    os._exit(code)
            conn.close()
            waiters.add(pid)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        for pid in waiters:  # tasks in flight end with the node
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while waiters and time.monotonic() < deadline:
            _reap(waiters)
            time.sleep(0.1)
    log.info("warm ClientApp runtime stopped")
    return 0


def _reap(waiters: set[int]) -> None:
    for pid in list(waiters):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
        waiters.discard(pid)


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    if len(head) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("malformed warm-runtime request (header or file descriptors missing)")
    (size,) = _HEADER.unpack(head)
    if size > _MAX_REQUEST:
        raise ConnectionError(f"warm-runtime request of {size} bytes refused")
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("warm-runtime request cut short")
        body += chunk
    req = json.loads(body)
    if not (isinstance(req.get("argv"), list) and isinstance(req.get("env"), dict) and isinstance(req.get("cwd"), str)):
        raise ConnectionError("malformed warm-runtime request (argv, env, cwd)")
    return req, list(fds)


def _waiter(conn: socket.socket, target: Any) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.getuid():
        log.warning("warm runtime: refused a connection from uid %d", uid)
        return 1
    req, fds = _recv_request(conn)
    task = os.fork()
    if task == 0:
        conn.close()
        _run_forked_task(req, fds, target)  # never returns
    for fd in fds:
        os.close(fd)

    def forward(signum: int, frame: FrameType | None) -> None:  # the node is stopping
        with contextlib.suppress(ProcessLookupError):
            os.kill(task, signum)

    signal.signal(signal.SIGTERM, forward)
    conn.sendall(f"pid {task}\n".encode())
    while True:
        done, status = os.waitpid(task, os.WNOHANG)
        if done:
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            return 0
        readable, _, _ = select.select([conn], [], [], 0.25)
        if readable and not conn.recv(64):  # the shim is gone: so is the task's reason to run
            log.warning("warm runtime: the task's launcher went away; stopping task %d", task)
            _stop(task)
            return 0


def _stop(pid: int, grace_s: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _run_forked_task(req: dict[str, Any], fds: list[int], target: Any) -> None:
    code = 1
    try:
        for sig in (*_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for std, fd in enumerate(fds):
            os.dup2(fd, std)
            os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in req["env"].items()})
        os.environ[WARM_TASK_ENV] = "1"
        os.chdir(req["cwd"])
        _reseed()
        sys.argv = ["flwr-clientapp", *req["argv"]]
        code = int(target(list(req["argv"])) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        log.exception("warm runtime: task failed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            import atexit

            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reseed() -> None:
    """Forked tasks must not share the server's random state (Python's ``random`` reseeds itself)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedrad.client.runtime.warm", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    ap.add_argument("--ready", type=Path, help="write this process's pid here once ready")
    ap.add_argument("--entry", default=DEFAULT_ENTRY, help=argparse.SUPPRESS)
    ap.add_argument("--preload", nargs="*", default=list(PRELOAD), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.socket, preload=args.preload, entry=args.entry, ready=args.ready)


if __name__ == "__main__":
    sys.exit(main())
