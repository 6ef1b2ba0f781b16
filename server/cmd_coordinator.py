"""``fedrad coordinator start|register``: run the federation's SuperLink (TLS, node authentication),
bound to loopback, behind the Fleet gateway that alone faces the hospitals."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fedrad.common.cli import console, err_console, stop_process
from fedrad.common.durable import atomic_write_json

if TYPE_CHECKING:
    from fedrad.server.coordinator import Coordinator


def prov_dir(value: Path | None) -> Path:
    """The provisioning folder: --prov, else $FEDRAD_PROV."""
    from fedrad.common.errors import ConfigError

    if value is None and os.environ.get("FEDRAD_PROV"):
        value = Path(os.environ["FEDRAD_PROV"])
    if value is None:
        raise ConfigError("<command line>", ["--prov: the provisioning folder is required (or set FEDRAD_PROV)"])
    return value.resolve()


def add_prov_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prov", type=Path, help="provisioning folder from `fedrad provision` (default: $FEDRAD_PROV)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("coordinator", help="run the coordinator (Flower SuperLink with TLS and node authentication)")
    csub = c.add_subparsers(dest="coordinator_action", metavar="ACTION", required=True)
    s = csub.add_parser(
        "start", help="start the SuperLink in the foreground and register the provisioned hospital keys",
        description="Starts flower-superlink on 127.0.0.1:<control port> only (its port also serves Flower's "
        "unauthenticated Control API) with the provisioned TLS certificate, SuperNode authentication, a database "
        "under <prov>/coordinator/state/ and run-time dependency installation disabled; starts the Fleet gateway on "
        "--host:--port, which forwards hospitals' Fleet API calls and nothing else; registers every provisioned, "
        "non-revoked hospital key; stops both on SIGTERM/Ctrl-C. Reach the Control API from elsewhere through an "
        "SSH tunnel to the control port (see the operator guide).")
    add_prov_argument(s)
    s.add_argument("--host", default="0.0.0.0",
                   help="address the Fleet gateway binds for hospitals (default 0.0.0.0; tests: 127.0.0.1)")
    s.add_argument("--port", type=int, help="public Fleet port (default: the provisioned superlink.port)")
    s.add_argument("--control-port", type=int,
                   help="loopback port of the SuperLink / Control API (default: the provisioned "
                   "superlink.control_port, else --port + 1)")
    s.add_argument("--insecure", action="store_true",
                   help="plaintext, no node authentication (testing only; hospitals must also pass --insecure)")
    s.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between the coordinator's checks for studies to start (Flower's default: 1; "
                   "it delays only a study's start, once, and every check costs the SuperLink a database "
                   "transaction, so shorter is not better)")
    s.set_defaults(handler=run_start)
    r = csub.add_parser("register", help="(re-)register provisioned keys with the running coordinator "
                        "(after add-node or revoke)")
    add_prov_argument(r)
    r.set_defaults(handler=run_register)
    h = csub.add_parser("app-hash", help="print the sha256 of the app bundle studies run with (hospitals approve "
                        "it with `fedrad-node apps approve --hash`)")
    add_prov_argument(h)
    h.set_defaults(handler=run_app_hash)


def run_app_hash(args: argparse.Namespace) -> int:
    from fedrad.server import coordinator as cdn

    console.print(cdn.app_hash(cdn.Coordinator(prov_dir(args.prov))), markup=False, soft_wrap=True)
    return 0


def run_start(args: argparse.Namespace) -> int:
    from fedrad.common.errors import FederationError
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    co.check_provisioned()
    state = json.loads((co.prov / "federation-state.json").read_text(encoding="utf-8"))
    port = args.port or int(str(state["superlink"]).rsplit(":", 1)[1])
    control_port = args.control_port or cdn.control_port_of(co, port)
    if control_port == port:
        raise FederationError(f"--control-port must differ from the public port {port}")
    co.state_dir.mkdir(parents=True, exist_ok=True)
    co.state_dir.chmod(0o700)
    address = cdn.local_address(co, control_port)  # the loopback SuperLink: what the flwr CLI talks to
    public = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    old = _running_pid(co)
    if old is not None:
        raise FederationError(f"a coordinator from {co.prov} already runs (PID {old}); `fedrad coordinator` "
                              "stops with SIGTERM (systemctl stop fedrad-coordinator)")
    cdn.write_flwr_config(co, address=address, insecure=args.insecure)
    cdn.write_app(co)
    env = cdn.with_own_scripts({**os.environ, **cdn.QUIET_ENV})  # Flower's commands of this environment
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(args.poll_interval))
    ca = None if args.insecure else co.ca
    # same process group: one SIGTERM to the unit stops them all
    link = subprocess.Popen(cdn.superlink_command(co, port=control_port, insecure=args.insecure), env=env)
    gateway: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        cdn.wait_until_listening(address, ca=ca, insecure=args.insecure, timeout=60, alive=link)
        gateway = subprocess.Popen(cdn.gateway_command(co, host=args.host, port=port, control_port=control_port,
                                                       insecure=args.insecure), env=env)
        cdn.wait_until_listening(public, ca=ca, insecure=args.insecure, timeout=60, alive=gateway)
        reg = {} if args.insecure else cdn.register_nodes(co)
        info = {"pid": os.getpid(), "superlink_pid": link.pid, "gateway_pid": gateway.pid, "address": address,
                "host": args.host, "port": port, "control_port": control_port, "insecure": args.insecure,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(co.info_path, info, mode=0o600)
        mode = ("[bold red]PLAINTEXT, no node authentication[/] (testing only)" if args.insecure
                else "TLS, SuperNode authentication on")
        console.print(f"coordinator listening on {args.host}:{port} for hospitals' Fleet API only ({mode}); "
                      f"hospitals connect to {state['superlink']}")
        console.print(f"Control API (fedrad run/status/stop) on {address} only; from another machine use "
                      f"`ssh -N -L {control_port}:127.0.0.1:{control_port} <this host>`", markup=False, soft_wrap=True)
        if not args.insecure:
            console.print(f"registered hospitals: {', '.join(f'{n} (node {i})' for n, i in sorted(reg.items())) or 'none'}")
            pending = _pending(co)
            if pending:
                console.print(f"waiting for public keys (not registered): {', '.join(pending)}", markup=False)
        console.print(f"state: {co.state_dir}; submit studies with `fedrad run --prov {co.prov} --config study.yaml`",
                      soft_wrap=True)
        while True:
            for name, proc in (("SuperLink", link), ("Fleet gateway", gateway)):
                rc = proc.poll()
                if rc is not None:
                    err_console.print(f"the {name} exited with code {rc} (log: {co.state_dir / 'superlink.log'})")
                    return rc or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        if gateway is not None:
            stop_process(gateway, grace_s=5)
        stop_process(link, grace_s=15)
        co.info_path.unlink(missing_ok=True)


def _pending(co: Coordinator) -> list[str]:
    from fedrad.server.provision import Provisioner

    return Provisioner(co.prov).pending()


def _running_pid(co: Coordinator) -> int | None:
    """PID of a coordinator already running from this provisioning folder, if any."""
    if not co.info_path.exists():
        return None
    try:
        pid = int(json.loads(co.info_path.read_text(encoding="utf-8"))["pid"])
        os.kill(pid, 0)
    except (ValueError, KeyError, ProcessLookupError, json.JSONDecodeError):
        return None
    except PermissionError:
        pass
    return pid


def run_register(args: argparse.Namespace) -> int:
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    if co.info().get("insecure"):
        console.print("the coordinator runs without TLS: node authentication is off, nothing to register")
        return 0
    reg = cdn.register_nodes(co)
    console.print(f"registered hospitals: {', '.join(f'{n} (node {i})' for n, i in sorted(reg.items())) or 'none'}")
    return 0
