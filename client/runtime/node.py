"""The deployed hospital: its Site from its own ``node.yaml`` (found through the SuperNode's node config).

Also the node's side of the connection: a TLS probe of the coordinator that names what is wrong
(unreachable, certificate from another CA, host name not in the certificate, expired), and the
in-process SuperNode launcher that shortens Flower's fixed 3 s message poll and its 1-10 s waits
for objects of a message that are still being uploaded (issue 14).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import sys
import time
import types
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedrad.client.runtime.node_config import NODE_CONFIG_KEY, NodeConfig, load_node_config
from fedrad.client.runtime.site import Site, dataset_fingerprint
from fedrad.common.config import StudyConfig
from fedrad.common.datasets import SiteData, load_npz
from fedrad.common.errors import DataError, PolicyViolation, ProtocolError
from fedrad.common.quick_pulls import QUICK_PULL_BACKOFF_S, quick_pulls_enabled, quicken_pulls

log = logging.getLogger(__name__)

@functools.lru_cache(maxsize=2)
def _site_data(source: str, path: Path, channels: int, image_size: int, class_names: tuple[str, ...] | None,
               default_cache: Path | None = None) -> SiteData:
    if source == "npz":
        splits = load_npz(path, channels=channels, image_size=image_size)
        k = int(max(splits["train"].labels.max(), splits["val"].labels.max())) + 1
        names = class_names or tuple(f"class-{i}" for i in range(k))
        return SiteData(train=splits["train"], val=splits["val"], class_names=tuple(names), origin=path.name)
    from fedrad.client.dicom.config import load_dicom_config
    from fedrad.client.dicom.dataset import load_dicom_site

    cfg = load_dicom_config(path)
    if cfg.cache_dir is None and default_cache is not None:
        # The archive is often mounted read-only (containers, systemd ProtectSystem=strict): by default the
        # node keeps its pixel cache under its own state folder, not inside the archive.
        cfg = cfg.model_copy(update={"cache_dir": default_cache})
    return load_dicom_site(cfg, progress=False)


def load_site(node: NodeConfig, *, channels: int, image_size: int, class_names: tuple[str, ...] | None) -> Site:
    if not node.data.path.exists():
        raise DataError(f"{node.data.path}: the node's data ({node.data.source}) does not exist")
    data = _site_data(node.data.source, node.data.path, channels, image_size, class_names,
                      node.state_dir / "dicom-cache")
    return Site(name=node.site, data=data, ledger_path=node.ledger_path, dataset_id=dataset_fingerprint(data),
                budget=(node.privacy.epsilon, node.privacy.delta), accountant=node.privacy.accountant,
                policy=node.policy, max_evaluations=node.evaluation.max_per_study, audit_key=node.audit.key_file)


def deployed_site(context: Context, study: StudyConfig) -> Site:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        raise ProtocolError(f"this SuperNode was started without --node-config '{NODE_CONFIG_KEY}=\"...node.yaml\"'")
    node = load_node_config(str(path))
    site = load_site(node, channels=study.data.channels, image_size=study.data.image_size,
                     class_names=study.data.class_names)
    # A cap that would cut the node's data is refused, never applied: a coordinator-chosen subset would be
    # another dataset, with a fresh ledger and budget each time. A cap the data already fits changes nothing.
    binding = [f"{k}={cap} (this node has {n})" for k, cap, n in (
        ("data.max_train_per_hospital", study.data.max_train_per_hospital, len(site.data.train)),
        ("data.max_val_per_hospital", study.data.max_val_per_hospital, len(site.data.val))) if cap is not None and cap < n]
    if binding:
        raise PolicyViolation(
            "whole_dataset", "data caps are a simulation setting; a deployed node trains and evaluates on its whole "
            f"dataset (node.yaml): remove {', '.join(binding)} from the study")
    return site


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError naming the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def probe_superlink(address: str, *, ca: Path | None, insecure: bool, timeout: float = 5.0
                    ) -> tuple[str, str] | None:
    """Connect to the coordinator as the SuperNode will; None if fine, else (problem, fix).

    ``problem`` starts with ``unreachable:`` when nothing answers (the SuperNode would keep retrying)
    and with ``tls:`` when the coordinator answers but cannot be trusted (the node cannot join).
    """
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return f"config: superlink {exc}", "set superlink to host:port of the coordinator"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return (f"unreachable: coordinator {address} not reachable ({exc.strerror or exc})",
                "check that the coordinator runs (fedrad status), the address and port, and the firewall")
    with sock:
        if insecure:
            return None if _speaks_plain_http(sock, host) else (
                f"tls: the coordinator {address} requires TLS; plaintext is refused",
                "remove `insecure: true` and --insecure (plaintext only works when the coordinator also runs --insecure)")
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return _explain_verify_error(exc, address, ca)
        except (ssl.SSLError, OSError) as exc:
            return (f"tls: TLS handshake with {address} failed ({exc}); the coordinator may run without TLS",
                    "ask the coordinator; plaintext needs --insecure on both sides (testing only)")


def _speaks_plain_http(sock: socket.socket, host: str) -> bool:
    """True if a plaintext HTTP request gets an HTTP answer (a TLS server drops it instead)."""
    try:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def _explain_verify_error(exc: ssl.SSLCertVerificationError, address: str, ca: Path | None) -> tuple[str, str]:
    code, msg = getattr(exc, "verify_code", 0), getattr(exc, "verify_message", str(exc))
    if code == 10:
        return (f"tls: the coordinator's certificate has expired ({address})",
                "the coordinator must renew its SuperLink certificate (fedrad provision --config federation.yaml --out DIR renew-superlink, then restart it)")
    if code == 62 or "hostname" in str(msg).lower() or "ip address mismatch" in str(msg).lower():
        return (f"tls: certificate/hostname mismatch: {address} is not among the certificate's names ({msg})",
                "use the address from your node kit, or ask the coordinator to add it to superlink.dns_names/ip_addresses")
    return (f"tls: the coordinator's certificate is not signed by the CA in {ca} ({msg})",
            "use ca.pem from this federation's node kit (root_certificates)")


#: ``0`` in the node's environment: waits for the node's own task as before issue 14's "deploy2"
#: change (Flower's 0.5 s, or the poll interval if shorter), for side-by-side measurements.
QUICK_LOCAL_WAITS_ENV = "FEDRAD_QUICK_LOCAL_WAITS"


def quick_local_waits() -> bool:
    return os.environ.get(QUICK_LOCAL_WAITS_ENV, "1").strip() != "0"


#: Flower's SuperNode loop sleeps 3 s between polls of the coordinator and 0.5 s while it waits for
#: its own task (the reply, then each reply object the task is still handing over): the former is
#: cut to the node's poll interval, the latter, a check of the node's own memory, to this.
LOCAL_WAIT_S = 0.05


class _PollClock(types.ModuleType):
    """Stand-in for ``time`` inside Flower's SuperNode loop: a poll of the coordinator (Flower's 3 s)
    sleeps at most ``interval`` seconds; a wait for the node's own task (Flower's 0.5 s) at most
    ``local`` seconds."""

    def __init__(self, interval: float, local: float = LOCAL_WAIT_S) -> None:
        super().__init__("time")
        # everything of ``time`` but ``sleep``: copied into the instance, it would shadow the method below
        self.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__") and k != "sleep"})
        self._interval = interval
        self._local = local

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._interval if seconds >= 1.0 else self._local))


#: Environment variable through which ``fedrad-node start`` passes the poll interval to its SuperNode process.
POLL_ENV = "FEDRAD_SUPERNODE_POLL_S"
#: How long the SuperNode holds a task process's pull of an object it is still receiving from the
#: coordinator before answering "not yet" (the task process then backs off 1 s and asks again).
OBJECT_HOLD_S = 5.0


def hold_unavailable_objects(handlers: types.ModuleType, *, hold_s: float = OBJECT_HOLD_S,
                             step_s: float = 0.05) -> None:
    """Wrap ``handlers.pull_object`` (the SuperNode's Runtime API handler) so that a pull of an object
    the node is still receiving waits up to ``hold_s`` for it instead of answering "not yet" at once.

    The SuperNode lists a task (and its message) before it has pulled the message's objects from
    the coordinator, so the task process usually asks for objects that are on their way; Flower's
    task process then sleeps 1, 2, 4, 8 s. Held here, it gets each object as soon as it arrives.
    Unknown objects are answered at once, as before.
    """
    if getattr(handlers, "_fedrad_hold", False):
        return
    orig = handlers.pull_object

    def pull_object(request: Any, state: Any, task: Any) -> Any:
        deadline = time.monotonic() + hold_s
        while True:
            res = orig(request, state, task)
            if res.object_available or not res.object_found or time.monotonic() >= deadline:
                return res
            time.sleep(step_s)

    handlers.pull_object = pull_object  # type: ignore[attr-defined]
    handlers._fedrad_hold = True  # type: ignore[attr-defined]


def _now() -> str:
    """Local wall-clock time as the node's other log lines print it (``2026-11-30 09:41:38,478``)."""
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t % 1 * 1000):03d}"


def time_message_hops(module: types.ModuleType) -> None:
    """Log how long the SuperNode took to receive each message's objects from the coordinator and to
    send each reply's (``module``: Flower's ``start_client_internal``); one line each with its wall
    time (the SuperNode's lines carry none), so that a message's hops can be timed
    (benchmarks/deploy_overhead.py)."""
    if getattr(module, "_fedrad_timed", False):
        return
    pull, push = module._pull_and_store_message, module.push_object_contents_from_iterable

    @functools.wraps(pull)
    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            log.info("message received from the coordinator in %.2fs (%s)", time.monotonic() - started, _now())
        return run_id

    @functools.wraps(push)
    def push_reply_objects(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        out = push(*args, **kwargs)
        log.info("reply sent to the coordinator in %.2fs (%s)", time.monotonic() - started, _now())
        return out

    module._pull_and_store_message = pull_and_store  # type: ignore[attr-defined]
    module.push_object_contents_from_iterable = push_reply_objects  # type: ignore[attr-defined]
    module._fedrad_timed = True  # type: ignore[attr-defined]


def run_supernode(argv: list[str], *, poll_interval_s: float | None, quick_pulls: bool = True) -> None:
    """Run ``flower-supernode`` in this process (argv without the program name).

    Flower 1.41 waits a fixed 3 s between message polls; with ``poll_interval_s`` set, the
    SuperNode's loop waits that long instead. With ``quick_pulls``, objects of a message still being
    uploaded are waited for in short steps (:func:`quicken_pulls`, :func:`hold_unavailable_objects`).
    Everything else is Flower's own code.
    """
    from flwr.supernode import start_client_internal

    local = LOCAL_WAIT_S if quick_local_waits() else None
    if poll_interval_s is not None or local is not None:
        interval = 3.0 if poll_interval_s is None else poll_interval_s  # Flower's 3 s unless set
        start_client_internal.time = _PollClock(  # type: ignore[attr-defined]
            interval, local=min(0.5, interval) if local is None else local)
        log.info("SuperNode message poll every %.2fs; waits for its own task checked every %.2fs", interval,
                 min(0.5, interval) if local is None else local)
    if quick_pulls:
        from flwr.supernode.servicer.runtime import runtime_handlers

        quicken_pulls(start_client_internal)
        hold_unavailable_objects(runtime_handlers)
        log.info("object pulls: retry after %.2f-%.2fs; task processes' pulls held up to %.0fs",
                 *QUICK_PULL_BACKOFF_S, OBJECT_HOLD_S)
    time_message_hops(start_client_internal)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":  # ``python -m fedrad.client.runtime.node FLOWER-SUPERNODE-ARGS``: what fedrad-node start runs
    from fedrad.client.runtime.gate import regate_path
    from fedrad.common.errors import FedradError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        regate_path()  # the SuperExec this SuperNode starts must be the node's, whatever ran us
    except FedradError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    poll = os.environ.get(POLL_ENV)
    run_supernode(sys.argv[1:], poll_interval_s=float(poll) if poll else None, quick_pulls=quick_pulls_enabled())
