"""Less SQLite work per object in the coordinator's SuperLink (issue 14).

Every object a hospital pulls or pushes (a ResNet-18 message is ~130 objects, each way, per
hospital and round) costs Flower 1.41's SuperLink three write transactions on its SQLite link
state, besides the node authentication: ``check_abort`` asks for the run's status, and
``get_run_status`` first runs ``_cleanup_expired_task_tokens`` (two UPDATEs over the task table),
then ``store_traffic`` adds the object's bytes to the run's counters (an UPDATE and a commit). On
the 2-core machine these were the SuperLink's largest CPU cost (benchmarks/results/deploy2.md).

Three changes, applied in the SuperLink process only (``python -m fedrad.server.coordinator``):

* :func:`throttle_token_cleanup`: the cleanup of expired task tokens runs at most once per
  :data:`TOKEN_CLEANUP_EVERY_S` per link state. A token expires when its task has sent no heartbeat
  for tens of seconds; noticing that up to one second later changes nothing.
* :func:`batch_traffic`: the traffic counters (bytes sent/received per run, what ``flwr ls``
  shows) are added up in memory and written every :data:`TRAFFIC_FLUSH_EVERY_S` in one
  transaction per run, and when the process exits. Nothing is dropped; the counters are at most
  that late.

* :func:`scope_middleware`: Flower runs every request through nine ``BaseHTTPMiddleware`` layers
  (each copies the request and response bodies through its own streams); four only ever act on
  Control API paths (``/v1/control/``), the Fleet event log only on Fleet paths (``/v1/fleet/``),
  and the runtime tracing only when ``FLWR_TRACING_ENABLED=1``. Each is now entered only for the
  paths it acts on, decided by the same test it applies itself; every other request goes straight
  to the next layer. Node authentication, the protobuf translation and the error translation
  still see every request.

Node authentication, run-status checks and object bookkeeping are Flower's, unchanged.
``FEDRAD_SUPERLINK_SQL_TUNING=0`` in the coordinator's environment switches all three off (for
side-by-side measurements).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: ``0`` keeps Flower's own per-call SQLite work; anything else, or unset, applies the tuning.
SQL_TUNING_ENV = "FEDRAD_SUPERLINK_SQL_TUNING"
#: Least time between two cleanups of expired task tokens, per link state.
TOKEN_CLEANUP_EVERY_S = 1.0
#: How often batched traffic counters are written.
TRAFFIC_FLUSH_EVERY_S = 0.5


def sql_tuning_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(SQL_TUNING_ENV, "1").strip() != "0"


def throttle_token_cleanup(cls: type, *, every_s: float = TOKEN_CLEANUP_EVERY_S,
                           clock: Callable[[], float] = time.monotonic) -> None:
    """Make ``cls._cleanup_expired_task_tokens`` run at most once per ``every_s`` per instance."""
    if getattr(cls, "_fedrad_cleanup_throttled", False):
        return
    orig = cls._cleanup_expired_task_tokens  # type: ignore[attr-defined]
    guard = threading.Lock()

    @functools.wraps(orig)
    def cleanup(self: Any) -> None:
        now = clock()
        with guard:
            due = self.__dict__.get("_fedrad_next_cleanup", float("-inf"))
            if now < due:
                return
            self.__dict__["_fedrad_next_cleanup"] = now + every_s
        orig(self)

    cls._cleanup_expired_task_tokens = cleanup  # type: ignore[attr-defined]
    cls._fedrad_cleanup_throttled = True  # type: ignore[attr-defined]


class TrafficBatch:
    """Bytes sent/received per run, added up until :meth:`flush` writes them with ``write``."""

    def __init__(self, write: Callable[[int, int, int], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._pending: dict[int, list[int]] = {}

    def add(self, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        with self._lock:
            row = self._pending.setdefault(run_id, [0, 0])
            row[0] += bytes_sent
            row[1] += bytes_recv

    def pending(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self._pending.items()}

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        failed: BaseException | None = None
        for run_id, (sent, recv) in pending.items():
            try:
                self._write(run_id, sent, recv)
            except ValueError as exc:  # the run is gone (Flower raises "Run ... not found")
                log.warning("traffic of run %s not recorded: %s", run_id, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. the database is locked: kept for the next flush
                self.add(run_id, bytes_sent=sent, bytes_recv=recv)
                failed = exc
        if failed is not None:
            raise failed


def batch_traffic(cls: type, *, every_s: float = TRAFFIC_FLUSH_EVERY_S) -> None:
    """Make ``cls.store_traffic`` add to a per-instance :class:`TrafficBatch`, written by a daemon
    thread every ``every_s`` and at interpreter exit."""
    if getattr(cls, "_fedrad_traffic_batched", False):
        return
    orig = cls.store_traffic  # type: ignore[attr-defined]
    guard = threading.Lock()

    def batch_of(self: Any) -> TrafficBatch:
        with guard:
            batch = self.__dict__.get("_fedrad_traffic")
            if batch is None:
                batch = TrafficBatch(lambda run_id, sent, recv: orig(self, run_id, bytes_sent=sent, bytes_recv=recv))
                self.__dict__["_fedrad_traffic"] = batch
                stop = threading.Event()

                def loop() -> None:
                    while not stop.wait(every_s):
                        try:
                            batch.flush()
                        except Exception:  # never let the flusher die: the next tick retries
                            log.exception("writing the batched traffic counters failed")

                def at_exit() -> None:
                    stop.set()
                    try:
                        batch.flush()
                    except Exception:  # noqa: BLE001 - at exit: say what was not written
                        log.exception("traffic counters not written at exit: %s", batch.pending())

                threading.Thread(target=loop, name="fedrad-traffic-flush", daemon=True).start()
                atexit.register(at_exit)
            return batch

    @functools.wraps(orig)
    def store_traffic(self: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        if bytes_sent < 0 or bytes_recv < 0 or bytes_sent == bytes_recv == 0:  # Flower's checks raise at once
            orig(self, run_id, bytes_sent=bytes_sent, bytes_recv=bytes_recv)
            return
        batch_of(self).add(run_id, bytes_sent=bytes_sent, bytes_recv=bytes_recv)

    cls.store_traffic = store_traffic  # type: ignore[attr-defined]
    cls._fedrad_traffic_batched = True  # type: ignore[attr-defined]


class PathScoped:
    """ASGI middleware: run ``inner`` (a ``BaseHTTPMiddleware`` class) only for HTTP requests whose
    path starts with ``prefix``; pass everything else straight to ``app``."""

    def __init__(self, app: Any, *, inner: type, prefix: str, args: tuple[Any, ...] = (),
                 kwargs: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.inner = inner(app, *args, **dict(kwargs or {}))
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            from starlette.requests import Request

            if Request(scope).url.path.startswith(self.prefix):  # the middleware's own test
                await self.inner(scope, receive, send)
                return
        await self.app(scope, receive, send)


def scoped_middleware(stack: list[Any], *, tracing: bool) -> list[Any]:
    """Flower's SuperLink middleware ``stack`` with its path-specific layers scoped (:class:`PathScoped`)
    and the runtime tracing left out unless ``tracing``; same order, nothing else changed."""
    from starlette.middleware import Middleware
    from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware

    prefixes = {control.ControlSensitiveResponseMiddleware: "/v1/control/",
                control.ControlAuthenticationMiddleware: "/v1/control/",
                control.ControlLicenseMiddleware: "/v1/control/",
                control.ControlEventLogMiddleware: "/v1/control/",
                FleetEventLogMiddleware: "/v1/fleet/"}
    out = []
    for m in stack:
        if m.cls is RuntimeTracingMiddleware and not tracing:
            continue
        prefix = prefixes.get(m.cls)
        out.append(m if prefix is None else Middleware(PathScoped, inner=m.cls, prefix=prefix, args=tuple(m.args),
                                                       kwargs=dict(m.kwargs)))
    return out


def scope_middleware() -> None:
    """Make Flower's SuperLink app (built after this call) use :func:`scoped_middleware`."""
    from flwr.superlink import main

    if getattr(main, "_fedrad_scoped", False):
        return
    orig = main._get_middleware

    def get_middleware() -> list[Any]:
        return scoped_middleware(list(orig()), tracing=os.getenv("FLWR_TRACING_ENABLED") == "1")

    main._get_middleware = get_middleware  # type: ignore[attr-defined]
    main._fedrad_scoped = True  # type: ignore[attr-defined]


def tune_superlink_sql() -> None:
    """Apply the three changes to Flower's SuperLink (this process)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    throttle_token_cleanup(SqlLinkState)
    batch_traffic(SqlLinkState)
    scope_middleware()
    log.info("SuperLink SQLite: expired-token cleanup at most every %.1fs, traffic counters written every %.1fs; "
             "path-specific middleware only on its paths", TOKEN_CLEANUP_EVERY_S, TRAFFIC_FLUSH_EVERY_S)
