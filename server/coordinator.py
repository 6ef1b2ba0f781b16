"""The coordinator: its SuperLink process, node registration, and the ``flwr`` Control API calls.

One provisioning folder (see :mod:`fedrad.server.provision`) drives everything::

    <prov>/coordinator/state/superlink.db     the SuperLink's persistent state (nodes, runs)
    <prov>/coordinator/state/superlink.log    its log (rotated daily)
    <prov>/coordinator/state/flwr/config.toml the Flower CLI connection "fedrad" (FLWR_HOME)
    <prov>/coordinator/state/coordinator.json where it listens, its PID, TLS on/off
    <prov>/coordinator/state/nodes.json       hospital name -> Flower node id (registered keys)
    <prov>/coordinator/state/runs.json        Flower run id -> run folder (``fedrad stop`` marks it)
    <prov>/coordinator/state/app/             the Flower App that ``fedrad run`` submits

The SuperLink runs with TLS (the provisioned certificate), SuperNode authentication (only the
registered hospital keys may join), a database on disk and run-time dependency installation
disabled. Messages' contents (the model arrays) in flight are kept in memory, not in that database
(:func:`run_superlink`: ``python -m fedrad.server.coordinator`` is ``flower-superlink`` with that one
change). It listens on loopback only (``127.0.0.1:<control port>``): Flower 1.41 serves its
Fleet, Control and ServerAppIo APIs on that one port, and the open-source Control API
authenticates nobody. Hospitals reach it through :mod:`fedrad.server.fleet_gateway` on the public
address, which forwards Fleet API calls only; ``fedrad run``/``status``/``stop`` (the ``flwr``
CLI) talk to the loopback port, so they work on the coordinator itself or through an SSH tunnel. ``flwr`` (the Flower CLI) is used for the Control API; its JSON answers are parsed here
and its failures turned into :class:`~fedrad.common.errors.FedradError` with a fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fedrad.common.errors import FederationError, FedradError

log = logging.getLogger(__name__)

#: Name of the Flower CLI connection fedrad writes into its own FLWR_HOME.
CONNECTION = "fedrad"

#: The Flower App ``fedrad run`` submits. It carries no code: the ServerApp and ClientApp come
#: from the fedrad package installed on the coordinator and on every hospital (same version).
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedrad-app"
version = "0.1.0"
description = "fedrad: federated, differentially private medical-image classification"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.flwr.app]
publisher = "fedrad"

[tool.flwr.app.components]
serverapp = "fedrad.server.app:app"
clientapp = "fedrad.client.runtime.secagg_app:app"

[tool.flwr.app.config]
study-config = ""
run-dir = ""
poll-interval = 0.25
registry = ""
"""

#: Environment for every Flower process fedrad starts: no package installs, no phoning home.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


@dataclass(frozen=True)
class Coordinator:
    """Paths of one coordinator, all under its provisioning folder."""

    prov: Path

    @property
    def coord(self) -> Path:
        return self.prov / "coordinator"

    @property
    def state_dir(self) -> Path:
        return self.coord / "state"

    @property
    def runs_index_path(self) -> Path:
        return self.state_dir / "runs.json"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def info_path(self) -> Path:
        return self.state_dir / "coordinator.json"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "nodes.json"

    @property
    def app_dir(self) -> Path:
        return self.state_dir / "app"

    @property
    def ca(self) -> Path:
        return self.coord / "ca.pem"

    def check_provisioned(self) -> None:
        missing = [p for p in (self.ca, self.coord / "superlink.pem", self.coord / "superlink.key") if not p.exists()]
        if missing:
            raise FedradError(f"{self.prov} is not a provisioning folder (missing {', '.join(map(str, missing))}); "
                              "run `fedrad provision --config federation.yaml --out DIR` first")

    # -- state files ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        try:
            return json.loads(self.info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FederationError(f"no coordinator was started from {self.prov} ({self.info_path} missing); "
                                  f"start it with `fedrad coordinator start --prov {self.prov}`") from None

    def registry(self) -> dict[str, str]:
        if not self.registry_path.exists():
            return {}
        return dict(json.loads(self.registry_path.read_text(encoding="utf-8")))

    def save_registry(self, reg: dict[str, str]) -> None:
        _atomic_write(self.registry_path, json.dumps(reg, indent=1, sort_keys=True))

    def names_by_node_id(self) -> dict[str, str]:
        return {node_id: name for name, node_id in self.registry().items()}


def _atomic_write(path: Path, text: str) -> None:
    from fedrad.common.durable import atomic_write_text

    atomic_write_text(path, text, mode=0o600)  # a fresh temporary name each time, never a fixed one


def _cert_names(pem: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(i) for i in san.get_values_for_type(x509.IPAddress)]


def local_address(co: Coordinator, port: int) -> str:
    """How tools on the coordinator reach its SuperLink: loopback if the certificate names it."""
    dns, ips = _cert_names(co.coord / "superlink.pem")
    if "127.0.0.1" in ips:
        return f"127.0.0.1:{port}"
    if "localhost" in dns:
        return f"localhost:{port}"
    state = json.loads((co.prov / "federation-state.json").read_text(encoding="utf-8"))
    return f"{str(state['superlink']).rsplit(':', 1)[0]}:{port}"


#: The only address the SuperLink itself (and with it the Control API) ever binds.
LOOPBACK = "127.0.0.1"


def superlink_command(co: Coordinator, *, host: str = LOOPBACK, port: int, insecure: bool) -> list[str]:
    """The SuperLink's command line (``flower-superlink`` through :func:`run_superlink`): TLS + node
    authentication unless ``insecure``.

    ``host`` must be a loopback address: the SuperLink's port carries the unauthenticated Control
    API, so only :func:`gateway_command` faces the network.
    """
    if host not in (LOOPBACK, "localhost", "::1"):
        raise FedradError(f"the SuperLink binds loopback only (asked for {host}): its port also serves the Control "
                          "API, which Flower does not authenticate; hospitals connect through the Fleet gateway")
    cmd = [sys.executable, "-m", "fedrad.server.coordinator", "--host", host, "--port", str(port),
           "--database", str(co.state_dir / "superlink.db"),
           "--log-file", str(co.state_dir / "superlink.log"), "--log-rotation-interval-hours", "24",
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")  # plaintext: node authentication needs TLS, so it is off too
    else:
        cmd += ["--ssl-ca-certfile", str(co.ca), "--ssl-certfile", str(co.coord / "superlink.pem"),
                "--ssl-keyfile", str(co.coord / "superlink.key"), "--enable-supernode-auth"]
    return cmd


def gateway_command(co: Coordinator, *, host: str, port: int, control_port: int, insecure: bool) -> list[str]:
    """The Fleet gateway on the public ``host:port``, forwarding Fleet calls to the loopback SuperLink."""
    import sys

    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [sys.executable, "-m", "fedrad.server.fleet_gateway", "--listen", listen,
           "--upstream", f"{LOOPBACK}:{control_port}"]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--certfile", str(co.coord / "superlink.pem"), "--keyfile", str(co.coord / "superlink.key"),
            "--ca", str(co.ca)]


#: Where the SuperLink keeps the objects of messages in flight (the model arrays): ``memory`` (the
#: default) or ``database`` (Flower's choice when ``--database`` names a file: the SQLite database).
OBJECT_STORE_ENV = "FEDRAD_SUPERLINK_OBJECT_STORE"
OBJECT_STORES = ("memory", "database")


def superlink_object_store(environ: dict[str, str] | None = None) -> str:
    value = (os.environ if environ is None else environ).get(OBJECT_STORE_ENV, "memory").strip() or "memory"
    if value not in OBJECT_STORES:
        raise FedradError(f"{OBJECT_STORE_ENV}={value!r}: expected one of {', '.join(OBJECT_STORES)}")
    return value


def keep_objects_in_memory() -> None:
    """Make this process's SuperLink keep message objects in memory while its runs, nodes and
    messages stay in the ``--database`` file.

    With a database file, Flower 1.41 also stores every object (a ResNet-18 message is ~130
    objects, 44.7 MB) in SQLite: writing one model took 5.6 s and registering its object tree 1 s
    on the shared 2-core machine, against 0.2 s in memory (benchmarks/results/knobs.md), and every
    round writes the model once and each hospital's update once. The objects are only in flight
    (deleted once the receiver confirms them); a SuperLink restart ends the runs in flight anyway,
    so nothing durable is lost. Flower's SQL link state works with any object store.
    """
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import config_loader

    if getattr(config_loader, "_fedrad_objects_in_memory", False):
        return

    def factory(database: str) -> ObjectStoreFactory:  # the database names the link state only
        return ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)

    config_loader.ObjectStoreFactory = factory  # type: ignore[attr-defined,assignment]
    config_loader._fedrad_objects_in_memory = True  # type: ignore[attr-defined]


def run_superlink(argv: Sequence[str], *, object_store: str = "memory", sql_tuning: bool = True) -> None:
    """Run ``flower-superlink`` in this process (argv without the program name); with
    ``object_store`` ``memory``, message objects are kept in memory (:func:`keep_objects_in_memory`);
    with ``sql_tuning``, less SQLite work per object pulled or pushed
    (:func:`fedrad.server.superlink_tuning.tune_superlink_sql`)."""
    if object_store == "memory":
        keep_objects_in_memory()
    log.info("SuperLink message objects kept in %s", object_store)
    if sql_tuning:
        from fedrad.server.superlink_tuning import tune_superlink_sql

        tune_superlink_sql()
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


def control_port_of(co: Coordinator, public_port: int) -> int:
    """The SuperLink's loopback port: provisioned ``superlink.control_port``, else the public port + 1."""
    state = json.loads((co.prov / "federation-state.json").read_text(encoding="utf-8"))
    return int(state.get("control_port") or public_port + 1)


def write_flwr_config(co: Coordinator, *, address: str, insecure: bool) -> None:
    """The Flower CLI connection ``fedrad`` in the coordinator's own FLWR_HOME."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{co.ca.resolve()}"')
    _atomic_write(co.flwr_home / "config.toml", "\n".join(lines) + "\n")


def write_app(co: Coordinator) -> Path:
    co.app_dir.mkdir(parents=True, exist_ok=True)
    pp = co.app_dir / "pyproject.toml"
    if not pp.exists() or pp.read_text(encoding="utf-8") != APP_PYPROJECT:
        pp.write_text(APP_PYPROJECT, encoding="utf-8")
    return co.app_dir


def app_hash(co: Coordinator) -> str:
    """sha256 of the app bundle (FAB) ``fedrad run`` submits: what each hospital approves.

    The bundle carries no code (it names the fedrad apps installed on both sides), so the hash
    changes only with this fedrad version's app definition. Built the way ``flwr run`` builds it.
    """
    import hashlib
    import tempfile

    app = write_app(co)
    with tempfile.TemporaryDirectory(prefix="fedrad-fab-") as tmp:
        out = subprocess.run(["flwr", "build", "--app", str(app.resolve())], cwd=tmp, env=flwr_env(co),
                             capture_output=True, text=True, timeout=120, check=False)
        fabs = list(Path(tmp).glob("*.fab"))
        if out.returncode != 0 or len(fabs) != 1:
            raise FederationError(f"could not build the app bundle: {(out.stderr or out.stdout).strip()[-500:]}")
        return hashlib.sha256(fabs[0].read_bytes()).hexdigest()


def with_own_scripts(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's script folder first on PATH: Flower's commands (``flwr``,
    ``flower-superlink``, and the ``flower-superexec`` / ``flwr-serverapp`` the SuperLink starts) are
    those of the environment fedrad runs in, also when that virtual environment is not activated."""
    scripts = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != scripts:
        path = os.pathsep.join([scripts, path]) if path else scripts
    return {**env, "PATH": path}


def flwr_env(co: Coordinator) -> dict[str, str]:
    return with_own_scripts({**os.environ, **QUIET_ENV, "FLWR_HOME": str(co.flwr_home.resolve())})


# -- probing ------------------------------------------------------------------------------------
def probe(address: str, *, ca: Path | None, insecure: bool, timeout: float = 5.0) -> str | None:
    """None if the SuperLink at ``address`` answers and (with TLS) its certificate verifies;
    else a sentence naming what is wrong: unreachable, another CA, host name, expiry, no TLS."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        return (f"coordinator {address} is not reachable ({getattr(exc, 'strerror', None) or exc}); is it running "
                "(`fedrad coordinator start`), and are the address, port and firewall right?")
    with sock:
        if insecure:
            try:
                sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                plain = sock.recv(5) == b"HTTP/"
            except OSError:
                plain = False
            return None if plain else f"the SuperLink at {address} requires TLS (it was not started with --insecure)"
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            code, msg = exc.verify_code, exc.verify_message
            if code == 10:
                return (f"the SuperLink certificate at {address} has expired: re-issue it "
                        "(`fedrad provision ... renew-superlink`) and restart the coordinator")
            if code == 62 or "mismatch" in str(msg).lower():
                return (f"certificate/hostname mismatch: {host} is not among the SuperLink certificate's names "
                        f"({msg}); add it to superlink.dns_names/ip_addresses and renew-superlink")
            return f"the SuperLink at {address} presents a certificate not signed by {ca} ({msg})"
        except (ssl.SSLError, OSError) as exc:
            return f"TLS handshake with {address} failed ({exc}); is the coordinator running with --insecure?"


def wait_until_listening(address: str, *, ca: Path | None, insecure: bool, timeout: float,
                         alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    problem: str | None = "not started"
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise FederationError(f"the SuperLink exited with code {alive.returncode} while starting "
                                  "(see its log); is the port already in use?")
        problem = probe(address, ca=ca, insecure=insecure, timeout=2.0)
        if problem is None:
            return
        if "not reachable" not in problem:
            raise FederationError(problem)
        time.sleep(0.2)
    raise FederationError(f"the SuperLink did not come up within {timeout:.0f}s: {problem}")


# -- the Flower CLI ---------------------------------------------------------------------------
def flwr_json(co: Coordinator, args: Sequence[str], *, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against this coordinator; its answer, or a FedradError."""
    cmd = ["flwr", *args, "--format", "json"]
    try:
        out = subprocess.run(cmd, env=flwr_env(co), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FederationError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f}s") from None
    try:
        data = json.loads(out.stdout[out.stdout.index("{"):]) if "{" in out.stdout else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise FederationError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): "
                              f"{(out.stderr or out.stdout).strip()[-600:]}")
    if not data.get("success", False):
        raise _translate(co, str(data.get("error-message", "")))
    return data


def _translate(co: Coordinator, message: str) -> FedradError:
    text = message.split("\n\n", 1)[-1].strip() or message.strip()
    if "unavailable" in text.lower():
        try:
            info = co.info()
            detail = probe(info["address"], ca=None if info.get("insecure") else co.ca, insecure=bool(info.get("insecure")))
        except FedradError as exc:
            detail = str(exc)
        return FederationError(detail or f"the coordinator did not answer: {text}")
    return FederationError(text)


# -- nodes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeStatus:
    name: str
    node_id: str
    status: str  # registered (never connected), online, offline, unregistered


def list_nodes(co: Coordinator) -> list[NodeStatus]:
    names = co.names_by_node_id()
    data = flwr_json(co, ["supernode", "ls", CONNECTION])
    out = []
    for n in data.get("nodes", []):
        node_id = str(n["node-id"])
        out.append(NodeStatus(name=names.get(node_id, f"node-{node_id}"), node_id=node_id, status=str(n["status"])))
    return out


def register_nodes(co: Coordinator) -> dict[str, str]:
    """Register every provisioned (non-revoked) hospital key; unregister revoked ones. Idempotent."""
    from .provision import Provisioner

    prov = Provisioner(co.prov)
    reg = co.registry()
    known = {n.node_id: n.status for n in list_nodes(co)}
    state = json.loads(prov.state_path.read_text(encoding="utf-8"))
    for name in sorted(state.get("revoked", {})):
        node_id = reg.pop(name, None)
        if node_id is not None and known.get(node_id) not in (None, "unregistered"):
            flwr_json(co, ["supernode", "unregister", node_id, CONNECTION])
            log.warning("unregistered revoked hospital %s (node %s)", name, node_id)
    for pub in prov.authorized_keys():
        name = pub.stem
        if name in reg and known.get(reg[name]) not in (None, "unregistered"):
            continue
        try:
            data = flwr_json(co, ["supernode", "register", str(pub), CONNECTION, "--name", name])
        except FederationError as exc:
            if "already in use" in str(exc):
                log.warning("key of %s is registered but its node id is unknown here (%s lost?)", name, co.registry_path)
                continue
            raise
        reg[name] = str(data["node-id"])
        log.info("registered hospital %s as node %s", name, reg[name])
    co.save_registry(reg)
    return reg


def wait_for_hospitals(co: Coordinator, *, needed: int, timeout: float, poll: float = 2.0) -> list[NodeStatus]:
    """Wait until ``needed`` hospitals are online; else FederationError naming who is missing."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list_nodes(co)
        online = [n for n in nodes if n.status == "online"]
        if len(online) >= needed:
            return online
        if time.monotonic() >= deadline:
            missing = sorted(n.name for n in nodes if n.status in ("registered", "offline"))
            raise FederationError(
                f"only {len(online)} hospital(s) online ({', '.join(n.name for n in online) or 'none'}), the study "
                f"needs {needed}; not connected after {timeout:.0f}s: {', '.join(missing) or 'no other hospital is registered'}"
                " (ask them to run `fedrad-node check` and start their node)")
        time.sleep(poll)


# -- runs -------------------------------------------------------------------------------------
def submit(co: Coordinator, *, study_file: Path, run_dir: Path, poll_interval: float) -> str:
    """Submit a study; returns the Flower run id. The run folder path travels in the run config."""
    app = write_app(co)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run-config.toml"
    overrides.write_text(f"study-config = {json.dumps(str(study_file))}\nrun-dir = {json.dumps(str(run_dir))}\n"
                         f"poll-interval = {float(poll_interval)}\n"
                         f"registry = {json.dumps(str(co.registry_path.resolve()))}\n", encoding="utf-8")
    data = flwr_json(co, ["run", str(app), CONNECTION, "--run-config", str(overrides)], timeout=120)
    run_id = str(data["run-id"])
    (run_dir / "flower-run-id").write_text(run_id + "\n", encoding="utf-8")
    index = run_dirs(co)
    index[run_id] = str(run_dir.resolve())
    _atomic_write(co.runs_index_path, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return run_id


def run_dirs(co: Coordinator) -> dict[str, str]:
    """Flower run id -> the run folder, for every run this coordinator submitted."""
    try:
        data = json.loads(co.runs_index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FederationError(f"{co.runs_index_path}: unreadable run index ({exc})") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def runs(co: Coordinator, run_id: str | None = None) -> list[dict[str, Any]]:
    """The runs (or one run) as ``flwr ls --format json`` lists them.

    Asked in this process through Flower's own Control API client (:func:`_runs_in_process`):
    ``fedrad run`` follows a study by asking every second, and a ``flwr`` process per question cost
    about 1 CPU second each on the coordinator (benchmarks/results/deploy2.md). Whatever goes wrong
    there is asked again through the ``flwr`` CLI, whose answers and errors are the reference.
    """
    try:
        # without a connection file Flower's code would write a default one; 0 switches this off
        if (co.flwr_home / "config.toml").is_file() and os.environ.get(CONTROL_IN_PROCESS_ENV, "1").strip() != "0":
            return _runs_in_process(co, run_id)
    except Exception as exc:  # noqa: BLE001 - the CLI below gives the error its proper message
        log.debug("in-process run listing failed (%s: %s); asking the flwr CLI", type(exc).__name__, exc)
    args = ["ls", CONNECTION] + (["--run-id", run_id] if run_id else [])
    return list(flwr_json(co, args).get("runs", []))


#: ``0`` lists runs through a ``flwr`` process per question again (side-by-side measurements).
CONTROL_IN_PROCESS_ENV = "FEDRAD_CONTROL_IN_PROCESS"
#: Flower Control API clients of this process, by FLWR_HOME (one connection per coordinator).
_CONTROL_CLIENTS: dict[str, Any] = {}


@contextlib.contextmanager
def _flwr_home(co: Coordinator) -> Iterator[None]:
    """FLWR_HOME of ``co`` while Flower's CLI code reads its connection (restored afterwards)."""
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(co.flwr_home.resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old


def _control_client(co: Coordinator) -> Any:
    """Flower's Control API client for ``co``'s connection, built as ``flwr`` builds it; cached."""
    key = str(co.flwr_home.resolve())
    client = _CONTROL_CLIENTS.get(key)
    if client is None:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        with _flwr_home(co), contextlib.redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." line
            client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        _CONTROL_CLIENTS[key] = client
    return client


def _runs_in_process(co: Coordinator, run_id: str | None) -> list[dict[str, Any]]:
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    client = _control_client(co)
    request = ListRunsRequest(run_id=int(run_id)) if run_id else ListRunsRequest()
    try:
        with _flwr_home(co):
            res = client.ListRuns(request)
    except Exception:
        _CONTROL_CLIENTS.pop(str(co.flwr_home.resolve()), None)  # e.g. the coordinator restarted
        raise
    if run_id and not res.run_dict:
        raise LookupError(f"run {run_id} not listed")
    rows = format_runs([run_from_proto(p) for p in res.run_dict.values()], res.now)
    return list(json.loads(_to_json(rows)).get("runs", []))


def stop(co: Coordinator, run_id: str, *, timeout: float = 120.0, poll: float = 2.0) -> Path | None:
    """Stop a run and wait (bounded) until Flower reports it finished, then mark the run's
    ``metrics.json`` ``interrupted`` (a resume re-runs the unfinished round). A stop request left in
    the run folder first makes the run's ServerApp save nothing more (it may still be waiting for
    replies when Flower ends the run), so the mark is the last word. Returns the run folder when known."""
    from fedrad.server.run_records import mark_interrupted
    from fedrad.server.stop_request import request_stop

    folder = run_dirs(co).get(run_id)
    if folder is not None:
        try:
            request_stop(Path(folder), run_id=run_id)
        except OSError as exc:  # the stop matters more than the bookkeeping
            log.warning("could not leave the stop request in %s (%s); stopping the run anyway", folder, exc)
    try:
        flwr_json(co, ["stop", run_id, CONNECTION])
    except FederationError:  # e.g. its ServerApp met the stop request and ended before Flower's stop
        if not all(str(r.get("status", "")).startswith("finished") for r in runs(co, run_id) or [{}]):
            raise
    deadline = time.monotonic() + timeout
    while True:
        listed = runs(co, run_id)
        if all(str(r.get("status", "")).startswith("finished") for r in listed):
            break
        if time.monotonic() > deadline:
            raise FederationError(f"run {run_id} was asked to stop but is still {listed[0].get('status')!r} "
                                  f"after {timeout:.0f} s; `fedrad status` shows it")
        time.sleep(poll)
    if folder is None:
        return None
    mark_interrupted(Path(folder), reason="stopped with `fedrad stop`")
    return Path(folder)


def logs(co: Coordinator, run_id: str, *, timeout: float = 60.0) -> str:
    out = subprocess.run(["flwr", "log", run_id, CONNECTION, "--show"], env=flwr_env(co), capture_output=True,
                         text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise _translate(co, out.stdout + out.stderr)
    return out.stdout


if __name__ == "__main__":  # ``python -m fedrad.server.coordinator FLOWER-SUPERLINK-ARGS``: what the coordinator runs
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        store = superlink_object_store()
    except FedradError as exc:
        log.error("%s", exc)
        sys.exit(2)
    from fedrad.server.superlink_tuning import sql_tuning_enabled

    run_superlink(sys.argv[1:], object_store=store, sql_tuning=sql_tuning_enabled())
