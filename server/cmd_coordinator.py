"""``fedrad coordinator start|register``: run the federation's SuperLink (TLS, node authentication)."""

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
        description="Starts flower-superlink with the provisioned TLS certificate, SuperNode authentication, a "
        "database under <prov>/coordinator/state/ and run-time dependency installation disabled; registers every "
        "provisioned, non-revoked hospital key; stops the SuperLink on SIGTERM/Ctrl-C.")
    add_prov_argument(s)
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0; tests: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: the provisioned superlink.port)")
    s.add_argument("--insecure", action="store_true",
                   help="plaintext, no node authentication (testing only; hospitals must also pass --insecure)")
    s.add_argument("--poll-interval", type=float, default=0.2,
                   help="seconds between the SuperLink's checks for runs to start (Flower's default: 1)")
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
    co.state_dir.mkdir(parents=True, exist_ok=True)
    co.state_dir.chmod(0o700)
    address = cdn.local_address(co, port)
    if args.host not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        address = f"{args.host}:{port}"
    old = _running_pid(co)
    if old is not None:
        raise FederationError(f"a coordinator from {co.prov} already runs (PID {old}); `fedrad coordinator` "
                              "stops with SIGTERM (systemctl stop fedrad-coordinator)")
    cdn.write_flwr_config(co, address=address, insecure=args.insecure)
    cdn.write_app(co)
    cmd = cdn.superlink_command(co, host=args.host, port=port, insecure=args.insecure)
    env = {**os.environ, **cdn.QUIET_ENV}
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(args.poll_interval))
    proc = subprocess.Popen(cmd, env=env)  # same process group: one SIGTERM to the unit stops both

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        cdn.wait_until_listening(address, ca=None if args.insecure else co.ca, insecure=args.insecure,
                                 timeout=60, alive=proc)
        reg = {} if args.insecure else cdn.register_nodes(co)
        info = {"pid": os.getpid(), "superlink_pid": proc.pid, "address": address, "host": args.host, "port": port,
                "insecure": args.insecure, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (co.info_path).write_text(json.dumps(info, indent=1), encoding="utf-8")
        mode = ("[bold red]PLAINTEXT, no node authentication[/] (testing only)" if args.insecure
                else "TLS, SuperNode authentication on")
        console.print(f"coordinator listening on {args.host}:{port} ({mode}); hospitals connect to "
                      f"{state['superlink']}")
        if not args.insecure:
            console.print(f"registered hospitals: {', '.join(f'{n} (node {i})' for n, i in sorted(reg.items())) or 'none'}")
        console.print(f"state: {co.state_dir}; submit studies with `fedrad run --prov {co.prov} --config study.yaml`",
                      soft_wrap=True)
        rc = proc.wait()
        err_console.print(f"the SuperLink exited with code {rc} (log: {co.state_dir / 'superlink.log'})")
        return rc or 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(proc, grace_s=15)
        co.info_path.unlink(missing_ok=True)


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
