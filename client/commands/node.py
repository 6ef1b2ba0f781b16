"""``fedrad-node check|start``: preflight a hospital node, then run it as a Flower SuperNode."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from fedrad.common.cli import console, err_console, stop_process
from fedrad.common.errors import ConfigError, FederationError, FedradError

if TYPE_CHECKING:
    from fedrad.client.runtime.node_config import NodeConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    k = sub.add_parser(
        "keygen", help="make this node's authentication key pair (private key stays here; send the .pub)",
        description="Writes DIR/node-auth.key (EC P-384, OpenSSH format, mode 0600; never overwritten), "
        "DIR/node-auth.pub and DIR/audit.key (the key of the node's audit log, mode 0600, kept if present), "
        "and prints the public key and its fingerprint. Send ONLY node-auth.pub to the "
        "coordinator; confirm the fingerprint with them by another channel (phone).")
    k.add_argument("--out", type=Path, required=True, help="folder for node-auth.key, node-auth.pub and audit.key "
                   "(normally the folder holding node.yaml)")
    k.add_argument("--comment", default="", help="comment appended to the public key (e.g. the hospital's name)")
    k.set_defaults(handler=run_keygen)
    c = sub.add_parser("check", help="preflight: report everything that would stop this node, each with its fix")
    c.add_argument("--config", type=Path, required=True, help="node.yaml")
    c.set_defaults(handler=run_check)
    s = sub.add_parser("start", help="join the federation as a Flower SuperNode (TLS and node key)")
    s.add_argument("--config", type=Path, required=True, help="node.yaml")
    s.add_argument("--insecure", action="store_true", help="plaintext, no TLS (testing only; must be explicit)")
    s.add_argument("--dry-run", action="store_true", help="print the SuperNode command instead of running it")
    s.add_argument("--debug", action="store_true",
                   help="the SuperNode logs at DEBUG, every request included (default: INFO, no per-poll lines)")
    s.set_defaults(handler=run_start)


class NodeRefusedError(FederationError):
    """The coordinator refuses to activate this node: its key is not registered there, or was revoked.

    Flower logs this as "Exit Code: 305 ... Failed to activate SuperNode" but its process exits 1 (a
    process cannot exit 305); ``fedrad-node start`` exits with this error's code, which a service
    manager can treat as final (the systemd unit's ``RestartPreventExitStatus``).
    """

    exit_code = 10


def flower_script(name: str) -> str | None:
    """Flower's console script ``name`` of this environment: beside the running interpreter first
    (a venv used without activating it), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def probe_coordinator(node: NodeConfig) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """Contact the coordinator as the SuperNode would (TCP, then TLS against the kit's CA and the
    configured host name): (problem, warning), each a (text, fix) pair or None. An unreachable
    coordinator is only a warning: the node starts anyway and keeps retrying."""
    from fedrad.client.runtime.node import probe_superlink

    found = probe_superlink(node.superlink, ca=node.root_certificates, insecure=node.insecure)
    if found is None:
        return None, None
    kind, text = found[0].split(": ", 1)
    return (None, (text, found[1])) if kind == "unreachable" else ((text, found[1]), None)


def preflight(config: Path, *, probe: bool = True, warnings: list[tuple[str, str]] | None = None
              ) -> list[tuple[str, str]]:
    """(problem, fix) pairs; empty when the node is ready.

    With ``probe`` the coordinator is contacted (:func:`probe_coordinator`); an unreachable one is
    appended to ``warnings`` (when given), not to the problems.
    """
    from cryptography import x509

    from fedrad.client.runtime.node import load_site
    from fedrad.client.runtime.node_config import load_node_config
    from fedrad.client.runtime.node_keys import check_private_key

    try:
        node = load_node_config(config)
    except ConfigError as exc:
        return [(p, "correct node.yaml (see docs in README, 'Deployment')") for p in exc.problems]
    problems: list[tuple[str, str]] = []
    if not node.insecure:
        if node.root_certificates is None or not node.root_certificates.exists():
            problems.append((f"CA certificate {node.root_certificates} missing",
                             "copy ca.pem from your node kit and set root_certificates"))
        else:
            try:
                ca = x509.load_pem_x509_certificate(node.root_certificates.read_bytes())
                if ca.not_valid_after_utc < dt.datetime.now(dt.UTC):
                    problems.append((f"CA certificate {node.root_certificates} expired on {ca.not_valid_after_utc:%Y-%m-%d}",
                                     "ask the coordinator for a new node kit"))
            except ValueError:
                problems.append((f"{node.root_certificates} is not a PEM certificate", "use ca.pem from the node kit"))
    if not node.insecure:
        problems += check_private_key(node.auth_private_key, expected_public=node.auth_public_key)
    try:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(node.state_dir, os.W_OK):
            raise PermissionError
    except OSError:
        problems.append((f"state folder {node.state_dir} is not writable", "create it and give the node's user write access"))
    problems += _dicom_cache_problems(node)
    try:
        site = load_site(node, channels=1, image_size=28, class_names=None)
        if len(site.data.train) == 0:
            problems.append((f"{node.data.path}: no training images", "check the data export"))
    except FedradError as exc:
        problems.append((str(exc), "fix the data path or files named above"))
    if flower_script("flower-supernode") is None:
        problems.append((f"flower-supernode not found beside {sys.executable} nor on PATH",
                         "install fedrad (pip install .) in this environment"))
    if probe and not any("CA certificate" in p for p, _ in problems):
        problem, warning = probe_coordinator(node)
        if problem is not None:
            problems.append(problem)
        if warning is not None and warnings is not None:
            warnings.append(warning)
    return problems


def _writable(folder: Path) -> bool:
    """Whether ``folder`` is (or could be created as) a folder this user can write."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def _dicom_cache_problems(node: NodeConfig) -> list[tuple[str, str]]:
    """The DICOM cache (index, preprocessed images) must be writable: by default it is a folder under
    the DICOM root, which containers and systemd mount read-only."""
    if node.data.source != "dicom":
        return []
    from fedrad.client.dicom.config import load_dicom_config

    try:
        cache = load_dicom_config(node.data.path).cache_path
    except FedradError:
        return []  # reported by the site check below, with its file and field
    if _writable(cache):
        return []
    return [(f"DICOM cache {cache} is not writable (the default is a folder under the DICOM root, which is "
             "read-only in the containers and the systemd unit)",
             f"set cache_dir in {node.data.path} to a folder under the node's state folder, e.g. "
             f"{node.state_dir / 'dicom-cache'}")]


def run_check(args: argparse.Namespace) -> int:
    import torch

    warnings: list[tuple[str, str]] = []
    problems = preflight(args.config, warnings=warnings)
    for warning, fix in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}\n  [bold]fix:[/] {fix}"
                          "\n  (the node would start anyway and keep retrying)")
    device = f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU (no CUDA GPU visible)"
    console.print(f"compute: {device}")
    _print_public_key(args.config)
    if not problems:
        console.print(f"[green]{args.config}: ready[/]")
        return 0
    for problem, fix in problems:
        err_console.print(f"[red]problem:[/] {problem}\n  [bold]fix:[/] {fix}")
    return 1


def run_keygen(args: argparse.Namespace) -> int:
    from fedrad.client.runtime.node_keys import generate

    pair = generate(args.out, comment=args.comment)
    audit_key, created = make_audit_key(args.out)
    console.print(f"private key: {pair.private_path} (mode 0600: keep it on this machine, never send it)",
                  markup=False, soft_wrap=True)
    console.print(f"audit key:   {audit_key} (mode 0600, {'new' if created else 'kept'}: keys the node's audit log; "
                  "never send it; node.yaml `audit: {key_file: ...}` names it, default audit.key beside node.yaml)",
                  markup=False, soft_wrap=True)
    console.print(f"public key:  {pair.public_path}", markup=False, soft_wrap=True)
    console.print(pair.public_openssh.decode("ascii"), markup=False, soft_wrap=True)
    console.print(f"fingerprint: {pair.fingerprint}", markup=False)
    console.print("send ONLY the public key file to the coordinator and read them the fingerprint by phone; they "
                  "run `fedrad provision ... add-node <name> --public-key node-auth.pub`", markup=False, soft_wrap=True)
    return 0


def make_audit_key(folder: Path) -> tuple[Path, bool]:
    """Create ``folder/audit.key`` (32 random bytes, 0600, O_EXCL|O_NOFOLLOW) unless it exists (then it is
    checked and kept): the key of the node's audit log, made with the node's key pair so that it exists
    before the node first runs, also where node.yaml's folder is read-only at run time (containers, systemd)."""
    from fedrad.client.governance.audit_key import DEFAULT_KEY_NAME, load_key

    path = Path(folder) / DEFAULT_KEY_NAME
    _, created = load_key(path, create=True)
    return path, created


def _print_public_key(config: Path) -> None:
    """Tell the operator which public key to send, when the node's private key is readable."""
    from fedrad.client.runtime.node_config import load_node_config
    from fedrad.client.runtime.node_keys import fingerprint, public_of

    try:
        node = load_node_config(config)
        if node.insecure or node.auth_private_key is None:
            return
        mine = public_of(node.auth_private_key)
    except (FedradError, OSError, ValueError, TypeError):
        return
    sent = f" ({node.auth_public_key})" if node.auth_public_key is not None else ""
    console.print(f"node key: fingerprint {fingerprint(mine)}; the coordinator registers its public key{sent} "
                  "(send that file, never the private key, and confirm the fingerprint by phone)",
                  markup=False, soft_wrap=True)


def supernode_command(config: Path, *, insecure: bool) -> list[str]:
    """The ``flower-supernode`` arguments this node runs with (TLS and node key unless insecure on both sides)."""
    from fedrad.client.runtime.node_config import NODE_CONFIG_KEY, load_node_config

    node = load_node_config(config)
    if node.insecure != insecure:
        raise FedradError("plaintext needs both `insecure: true` in node.yaml and --insecure on the command line"
                          if insecure or node.insecure else "inconsistent TLS settings")
    cmd = ["flower-supernode", "--superlink", node.superlink,
           "--node-config", f'{NODE_CONFIG_KEY}="{Path(config).resolve()}"',
           "--port", str(node.runtime_port)]
    if insecure:
        # Flower refuses node authentication over plaintext: an insecure node is also unauthenticated,
        # so only a coordinator started with --insecure (and no node authentication) accepts it.
        cmd.append("--insecure")
    else:
        if node.root_certificates is None:
            raise FedradError("node.yaml: root_certificates is required for TLS")
        cmd += ["--root-certificates", str(node.root_certificates)]
        if node.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(node.auth_private_key)]
    if node.max_wait_time_s is not None:
        cmd += ["--max-wait-time", str(node.max_wait_time_s)]
    return cmd


#: How long ``fedrad-node start`` waits for the warm runtime's imports before joining anyway.
WARM_START_TIMEOUT_S = 120.0


def run_start(args: argparse.Namespace) -> int:
    from fedrad.client.runtime.node import POLL_ENV
    from fedrad.client.runtime.node_config import load_node_config

    cmd = supernode_command(args.config, insecure=args.insecure)
    if args.dry_run:
        console.print(shlex.join(cmd), markup=False, soft_wrap=True)
        return 0
    problems = preflight(args.config, probe=False)
    if problems:
        raise FedradError("preflight failed: " + "; ".join(p for p, _ in problems) + " (run fedrad-node check)")
    node = load_node_config(args.config)
    problem, warning = probe_coordinator(node)
    if problem is not None:
        raise FedradError(f"{problem[0]} (fix: {problem[1]})")
    if warning is not None:
        err_console.print(f"[yellow]warning:[/] {warning[0]}; the node keeps retrying")
    # Every ClientApp task runs behind the node's app-approval gate (an unapproved FAB is never
    # unpacked), and nothing is installed at run time: the node runs the fedrad installed here.
    from fedrad.client.runtime.gate import check_gated, gated_env, write_shim

    bin_dir = node.state_dir / "bin"
    write_shim(bin_dir)
    env = gated_env(bin_dir=bin_dir, node_config=args.config)
    # then Flower's commands of this environment, also when its virtual environment is not activated
    gate_dir, _, rest = env["PATH"].partition(os.pathsep)
    env["PATH"] = os.pathsep.join([gate_dir, str(Path(sys.executable).parent), rest])
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    check_gated(env, bin_dir=bin_dir)
    if node.poll_interval_s is not None:
        env[POLL_ENV] = str(node.poll_interval_s)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(node.poll_interval_s))
    warm = None
    if node.warm_runtime:
        from fedrad.client.runtime.warm import WARM_SOCKET_ENV

        sock = node.state_dir / "run" / "warm.sock"
        ready = sock.with_name("warm.ready")
        ready.unlink(missing_ok=True)
        env[WARM_SOCKET_ENV] = str(sock)
        warm = subprocess.Popen([sys.executable, "-m", "fedrad.client.runtime.warm", "--socket", str(sock),
                                 "--ready", str(ready)], env=env)
        # join the federation once tasks can start warm (else they start cold: slower, same result)
        deadline = time.monotonic() + WARM_START_TIMEOUT_S
        while not ready.exists() and warm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not ready.exists():
            err_console.print("[yellow]warning:[/] the warm runtime is not ready; tasks start cold until it is")
    env[LOG_LEVEL_ENV] = "DEBUG" if args.debug else "INFO"
    if args.debug:
        env["FLWR_LOG_LEVEL"] = "DEBUG"
    env[MARKERS_ENV] = str(node.state_dir / "run")
    try:
        return supervise([sys.executable, "-m", "fedrad.client.commands.node", *cmd[1:]], env=env,
                         rejoin_timeout_s=node.rejoin_timeout_s, markers=node.state_dir / "run")
    finally:
        if warm is not None:  # tasks in flight are stopped with the node
            stop_process(warm, grace_s=30)


#: Flower 1.41 answers an activation it refuses with this, both for a key it does not know (never
#: registered, or revoked) and for a node it still counts online (a crash and a quick restart).
REFUSED_TEXT = "Failed to activate SuperNode"
#: Flower logs this once the SuperLink has activated the node.
CONNECTED_TEXT = "SuperNode ID:"
#: How long after this node's last sign of life the SuperLink may still count it online: Flower's
#: heartbeat patience x interval (2 x 30 s, flwr.common.constant) plus margin.
ONLINE_WINDOW_S = 80.0
#: A node that was not online within ONLINE_WINDOW_S is refused for good once refusals have lasted
#: this long (covers a coordinator that is still registering keys while it starts).
REFUSAL_GRACE_S = 15.0
#: Environment of the SuperNode process: its log level, and the folder of its connection markers.
LOG_LEVEL_ENV = "FEDRAD_NODE_LOG_LEVEL"
MARKERS_ENV = "FEDRAD_NODE_MARKERS"
ONLINE_MARKER, REFUSED_MARKER = "supernode-online", "supernode-refused"


class ConnectionWatch(logging.Handler):
    """In the SuperNode process, on Flower's logger: records activation (touches ``supernode-online``)
    and refusal (writes ``supernode-refused``) in ``folder`` for the supervising ``fedrad-node start``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(logging.DEBUG)
        self.folder = folder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if CONNECTED_TEXT in text:
                (self.folder / ONLINE_MARKER).touch()
            elif REFUSED_TEXT in text:
                (self.folder / REFUSED_MARKER).write_text(f"{time.time():.0f}\n", encoding="utf-8")
        except OSError:  # never let bookkeeping break the SuperNode
            pass


def configure_supernode_logging(*, level_name: str, markers: Path | None) -> None:
    """Logging of the SuperNode process: INFO (DEBUG with ``level_name`` "DEBUG"), no line per HTTP
    request or runtime poll, every Flower line once; with ``markers``, :class:`ConnectionWatch` on."""
    level = logging.DEBUG if level_name.upper() == "DEBUG" else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)  # a handler, not only the root logger, filters: records propagate past levels
    logging.basicConfig(level=level, handlers=[handler])
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(level if level == logging.DEBUG else logging.WARNING)
    # Flower logs DEBUG lines per runtime request (e.g. "Runtime.AcquireTask") through its own console
    # handler (INFO unless FLWR_LOG_LEVEL=DEBUG); passed on to the root handler too they would print
    # at DEBUG, and every Flower line twice.
    flower = logging.getLogger("flwr")
    flower.propagate = False
    if markers is not None:
        markers.mkdir(parents=True, exist_ok=True)
        flower.addHandler(ConnectionWatch(markers))


def supernode_main() -> None:
    """``python -m fedrad.client.commands.node FLOWER-SUPERNODE-ARGS``: what ``fedrad-node start`` runs.

    Sets up logging (:func:`configure_supernode_logging`), then runs ``fedrad.client.runtime.node`` as the
    main module (its own ``basicConfig`` then changes nothing).
    """
    import runpy

    folder = os.environ.get(MARKERS_ENV)
    configure_supernode_logging(level_name=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                                markers=Path(folder) if folder else None)
    if folder:
        from flwr.supernode.fleet_http_client import FleetHttpClient

        FleetHttpClient.ActivateNode = retry_refusal_while_maybe_online(  # type: ignore[method-assign]
            FleetHttpClient.ActivateNode, online=Path(folder) / ONLINE_MARKER)
    runpy.run_module("fedrad.client.runtime.node", run_name="__main__", alter_sys=True)


def retry_refusal_while_maybe_online(activate: Callable[..., T], *, online: Path, pause_s: float = 1.0,
                                     online_window_s: float = ONLINE_WINDOW_S) -> Callable[..., T]:
    """Wrap Flower's ``ActivateNode`` call so that the refusal Flower gives a node it still counts
    online (HTTP 412 "Failed to activate SuperNode": a crash and a quick restart) is retried in this
    process, every ``pause_s``, while this node's last sign of life (``online``'s time) is under
    ``online_window_s`` old. Without it the SuperNode exits and the launcher pays its pause and a
    cold SuperNode start (40 s and more on a loaded machine): the node missed the next rounds. Any
    other error, or a refusal after that window (an unknown or revoked key), is raised as before."""
    import httpx

    def wrapped(*args: Any, **kwargs: Any) -> T:
        deadline: float | None = None  # fixed at the first refusal: nothing can extend it
        while True:
            try:
                return activate(*args, **kwargs)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 412 or REFUSED_TEXT not in exc.response.text:
                    raise
                if deadline is None:
                    last_alive = _mtime(online)
                    deadline = (last_alive + online_window_s) if last_alive is not None else time.time()
                if time.time() >= deadline:
                    raise
                log.info("activation refused while the previous connection may still count online; "
                         "retrying in %.0f s (for up to %.0f s more)", pause_s, deadline - time.time())
                time.sleep(pause_s)

    return wrapped


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _wait(proc: subprocess.Popen[bytes], *, online: Path, started_wall: float, tick_s: float = 1.0,
          alive_every_s: float = 5.0) -> int:
    """Wait for ``proc``; while it is activated, keep ``online``'s time fresh (this node's last sign of life)."""
    connected, last_touch = False, 0.0
    while True:
        try:
            return proc.wait(timeout=tick_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if connected:  # alive up to now (also when it just exited)
                online.touch()
        if not connected:
            seen = _mtime(online)
            connected = seen is not None and seen >= started_wall - 1
        if connected and time.monotonic() - last_touch >= alive_every_s:
            online.touch()
            last_touch = time.monotonic()


def supervise(cmd: list[str], *, env: dict[str, str], rejoin_timeout_s: float, markers: Path,
              pause_s: float = 10.0, online_window_s: float = ONLINE_WINDOW_S,
              refusal_grace_s: float = REFUSAL_GRACE_S, long_run_s: float = 60.0) -> int:
    """Run the SuperNode; restart it while it keeps failing for less than ``rejoin_timeout_s``.

    Flower refuses to activate a node whose previous connection the SuperLink still counts as
    online (a crash followed by a quick restart), with the same message as for an unknown or revoked
    key. So a refusal is retried only while this node may still count as online (its last sign of
    life, kept in ``markers``, is under ``online_window_s`` old) and for ``refusal_grace_s``; after
    that it is final: :class:`NodeRefusedError`. A SuperNode that ran over ``long_run_s`` starts a
    new streak of failures when it exits. SIGTERM/SIGINT are passed on and end the node
    cleanly (exit 0).
    """
    state: dict[str, object] = {"stop": False, "proc": None}

    def forward(signum: int, frame: FrameType | None) -> None:
        state["stop"] = True
        proc = state["proc"]
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(cmd, env=env, state=state, rejoin_timeout_s=rejoin_timeout_s, markers=markers,
                          pause_s=pause_s, online_window_s=online_window_s, refusal_grace_s=refusal_grace_s,
                          long_run_s=long_run_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(cmd: list[str], *, env: dict[str, str], state: dict[str, object], rejoin_timeout_s: float,
               markers: Path, pause_s: float, online_window_s: float, refusal_grace_s: float,
               long_run_s: float) -> int:
    markers.mkdir(parents=True, exist_ok=True)
    online, refused = markers / ONLINE_MARKER, markers / REFUSED_MARKER
    failing_since: float | None = None
    refused_since: float | None = None
    while True:
        refused.unlink(missing_ok=True)
        started, started_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(cmd, env=env)
        state["proc"] = proc
        rc = _wait(proc, online=online, started_wall=started_wall)
        if state["stop"]:
            return 0
        # rc 0 without our signal: Flower shut itself down (it signals itself on "401 Unauthorized",
        # e.g. when the coordinator removed this node's key): restarted, and a refusal then ends it.
        now = time.monotonic()
        if failing_since is None or now - started > long_run_s:  # ran a while: a new streak of failures starts now
            failing_since = now
        if refused.exists():
            refused_since = refused_since if refused_since is not None else now
            last_alive = _mtime(online)
            maybe_online = last_alive is not None and time.time() - last_alive < online_window_s
            if rejoin_timeout_s <= 0 or (not maybe_online and now - refused_since >= refusal_grace_s) \
                    or now - failing_since >= rejoin_timeout_s:
                raise NodeRefusedError(
                    "the coordinator refuses this node (Flower: \"Exit Code: 305, Failed to activate SuperNode\"): "
                    "its public key is not registered there or was revoked. Ask the coordinator to check "
                    "`fedrad status` / run `fedrad coordinator register`; a revoked hospital needs a new name "
                    "and key.")
        else:
            refused_since = None
        if now - failing_since >= rejoin_timeout_s:
            raise FedradError(
                f"the SuperNode exited with code {rc} (see its log above) and kept failing for "
                f"{now - failing_since:.0f}s (rejoin_timeout_s={rejoin_timeout_s:.0f})")
        err_console.print(f"[yellow]SuperNode exited with code {rc}; restarting in {pause_s:.0f}s "
                          f"(gives up {rejoin_timeout_s - (now - failing_since):.0f}s from now)[/]")
        deadline = time.monotonic() + pause_s
        while time.monotonic() < deadline and not state["stop"]:
            time.sleep(0.2)
        if state["stop"]:
            return 0


if __name__ == "__main__":
    supernode_main()
