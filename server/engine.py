"""Flower's simulation engine: run a ServerApp with N simulated hospitals, each message handled by the
ClientApp named by a reference string. Used by plain studies (:mod:`fedrad.server.simulation`) and
secure-aggregation studies (:mod:`fedrad.server.secagg`) alike.

What this module decides (issue 14, measured in ``benchmarks/results/simperf.md``):

* **How many ClientApp processes (Ray actors) start**: as many as fit the cores this process may
  use at ``federation.client_cpus`` each, and never more than there are hospitals
  (:func:`engine_plan`). Hospitals take turns on them; a hospital is a partition id, not a process,
  so 100 hospitals on 2 cores still start 2 actors.
* **Ray is started by fedrad, without a runtime environment** (in place of Flower's backend's
  ``init_ray``, at the same moment, with the signal handlers kept). Flower's backend would start Ray
  with ``runtime_env={"env_vars": {"PYTHONPATH": ...}}``; workers with a runtime environment cannot
  reuse the workers Ray pre-starts at init, so two more Python processes were started (and the
  pre-started ones left idle). The same ``PYTHONPATH`` is set in the environment the workers inherit.
* **The coordinator never imports the ClientApp.** :class:`LazyClientApp` carries only the
  reference; the ClientApp module (torch, Opacus, the hospital code) is imported in the actor that
  runs it, at its first message. Only the module's presence is checked up front.
* **No telemetry**: Flower's and Ray's usage reporting are off, as in deployment.
* **Dispatch in linear time.** Flower 1.41's simulation runtime hands messages to the actors from a
  thread that, every 0.1 s, asks the in-memory link state for each node's next message; each such
  query scans every stored message, so a sweep costs O(hospitals x messages): about 0.1 s of CPU
  per sweep at 100 hospitals, half a core for the whole round. :func:`_dispatch_messages` first
  finds, in one scan, which nodes have an undelivered message and asks only for those (Flower's
  own query, so expiry and delivery marking are unchanged). It replaces Flower's loop only while a
  simulation runs and only where the link state is the in-memory one it knows.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedrad.common.config import StudyConfig
from fedrad.common.errors import FederationError

log = logging.getLogger(__name__)

CLIENT_APP_REF = "fedrad.client.runtime.app:app"

#: Environment of the simulation and of every process it starts: no phoning home, quiet Ray.
ENGINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray's memory monitor kills a worker when the whole machine (other programs included) is above
    # 95 % memory; a killed actor stays in Flower's pool and fails every later message sent to it
    # (measured: 98 of 100 hospitals "failed" while this simulation used 2 GB of a 24 GB machine
    # others had filled). Off: the kernel's OOM killer decides, as for any other program.
    "RAY_memory_monitor_refresh_ms": "0",
}


def load_client_app(ref: str = CLIENT_APP_REF) -> ClientApp:
    """Import ``module:attribute`` and return it; it must be a Flower ClientApp."""
    module_name, _, attr = ref.partition(":")
    app = getattr(importlib.import_module(module_name), attr)
    if not isinstance(app, ClientApp):
        raise FederationError(f"{ref} is not a Flower ClientApp")
    return app


class LazyClientApp(ClientApp):
    """A ClientApp that stands for the one ``ref`` names and imports it where it runs.

    Pickled (to a Ray actor, with every message) it carries only ``ref``; the real app is imported
    in the actor at its first message and kept for the next ones."""

    def __init__(self, ref: str) -> None:
        super().__init__()
        self.ref = ref
        self._app: ClientApp | None = None

    def __call__(self, message: Message, context: Context) -> Message:
        if self._app is None:
            self._app = load_client_app(self.ref)
        return self._app(message, context)

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": self.ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ref"])  # type: ignore[misc]


def check_client_app_ref(ref: str) -> None:
    """Refuse a reference whose module cannot be found (without importing it)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FederationError(f"ClientApp reference {ref!r} is not of the form module:attribute")
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise FederationError(f"ClientApp module {module_name!r} not found")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EnginePlan:
    """How the simulated federation uses the machine."""

    #: ClientApp processes (Ray actors) started; hospitals take turns on them.
    actors: int
    #: Logical CPUs Ray is started with (the node's ``CPU`` resource).
    ray_cpus: int
    #: Ray ``num_cpus`` of one actor; ``ray_cpus / client_cpus`` rounds down to ``actors``.
    client_cpus: float
    client_gpus: float

    def backend_config(self) -> dict[str, Any]:
        """Flower's ``backend_config`` for :func:`flwr.simulation.run_simulation`."""
        return {
            "client_resources": {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus},
            "init_args": self.ray_init_args(),
        }

    def ray_init_args(self) -> dict[str, Any]:
        return {"num_cpus": self.ray_cpus, "include_dashboard": False, "log_to_driver": False,
                "logging_level": "error"}


def engine_plan(*, num_hospitals: int, client_cpus: float, client_gpus: float, cores: int) -> EnginePlan:
    """As many actors as fit ``cores`` at ``client_cpus`` each (at least one), at most one per hospital.

    ``client_cpus`` above ``cores`` is taken as ``cores`` (one actor). Ray counts CPUs in whole
    units and resources to four decimals, so a fractional share is rounded down until exactly
    ``actors`` fit."""
    if num_hospitals < 1 or cores < 1 or client_cpus <= 0:
        raise FederationError(f"cannot plan {num_hospitals} hospitals on {cores} cores at {client_cpus} CPUs each")
    per = min(float(client_cpus), float(cores))
    actors = max(1, min(int(cores / per + 1e-9), num_hospitals))
    ray_cpus = min(cores, max(1, math.ceil(actors * per - 1e-9)))
    share = per
    if int(ray_cpus / share + 1e-9) != actors:  # a fractional share would fit more actors: widen it
        share = math.floor(ray_cpus / actors * 10_000) / 10_000
    return EnginePlan(actors=actors, ray_cpus=ray_cpus, client_cpus=share, client_gpus=float(client_gpus))


class _DropRunSimulationDeprecation(logging.Filter):
    """``run_simulation`` is Flower's in-process simulation entry point; its deprecation notice
    (pointing at ``flwr run``) is not actionable for fedrad users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_deprecation() -> None:
    lg = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in lg.filters):
        lg.addFilter(_DropRunSimulationDeprecation())


def _engine_environment() -> None:
    """:data:`ENGINE_ENV` (unless set), in this process and for every process the engine starts."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    try:  # Flower reads its telemetry switch when first imported, which may have been before
        from flwr.supercore import telemetry

        telemetry.FLWR_TELEMETRY_ENABLED = os.environ["FLWR_TELEMETRY_ENABLED"]
    except ImportError:  # pragma: no cover - a Flower without that module sends nothing either
        pass


#: Signals whose handlers Ray's start would replace (SIGTERM: exit at once) and fedrad keeps.
KEPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def start_ray(plan: EnginePlan) -> bool:
    """Start Ray for ``plan`` unless it runs already; True if this call started it.

    Workers inherit ``PYTHONPATH`` (this interpreter's ``sys.path``, as Flower's backend would pass
    in a runtime environment) so they import what this process imports. The signal handlers in
    force before (fedrad's stop at a safe point) are in force after: Ray's start installs its own
    SIGTERM handler, which exits at once and leaves the ServerApp thread waiting."""
    import ray

    if ray.is_initialized():
        return False
    _engine_environment()
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    main = threading.current_thread() is threading.main_thread()
    kept = {s: signal.getsignal(s) for s in KEPT_SIGNALS} if main else {}
    try:
        ray.init(**plan.ray_init_args())
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
    log.debug("Ray started: %d CPUs for %d ClientApp actors", plan.ray_cpus, plan.actors)
    return True


@contextmanager
def fedrad_starts_ray(plan: EnginePlan) -> Iterator[bool]:
    """While inside, Flower's Ray backend starts Ray with :func:`start_ray` (at the point Flower
    would, i.e. while the ServerApp thread prepares the study) instead of its own ``init_ray``;
    yields whether it does (False: an unknown Flower version; then Ray is started here and now)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = getattr(raybackend.RayBackend, "init_ray", None)
    if original is None or list(inspect.signature(original).parameters) != ["self", "backend_config"]:
        start_ray(plan)
        yield False
        return

    def init_ray(self: Any, backend_config: Any) -> None:
        start_ray(plan)

    raybackend.RayBackend.init_ray = init_ray  # type: ignore[method-assign]
    try:
        yield True
    finally:
        raybackend.RayBackend.init_ray = original  # type: ignore[method-assign]


def _pending_nodes(state: Any, nodes: set[int]) -> list[int] | None:
    """The nodes (of ``nodes``) with an undelivered message in ``state``, in one scan; None when
    ``state`` is not Flower's in-memory link state (then every node is asked, as Flower does)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [n for n in nodes if n in pending]


def _dispatch_messages(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],
                       f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (at most one message per node per 0.1 s sweep, taken with
    ``state.get_message_ins``), asking only the nodes that have a message waiting."""
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        pending = _pending_nodes(state, nodes)
        for node_id in nodes if pending is None else pending:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


@contextmanager
def linear_dispatch() -> Iterator[bool]:
    """While inside, Flower's simulation runtime dispatches with :func:`_dispatch_messages`; yields
    whether it does (False: an unknown Flower version, whose own loop is left in place)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "add_messages_to_queue", None)
    expected = ["state", "queue", "nodes_mapping", "f_stop"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        yield False
        return
    vce_api.add_messages_to_queue = _dispatch_messages
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


def stop_ray() -> None:
    """Shut Ray down if it runs (Flower's backend does at the end of a simulation; not after an
    error before its start)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def study_plan(study: StudyConfig) -> EnginePlan:
    fed = study.federation
    return engine_plan(num_hospitals=fed.num_hospitals, client_cpus=fed.client_cpus, client_gpus=fed.client_gpus,
                       cores=available_cores())


def run_engine(server_app: ServerApp, *, client_app_ref: str, study: StudyConfig) -> None:
    """Run ``server_app`` with ``federation.num_hospitals`` simulated hospitals on Flower's engine.

    Ray is shut down when the simulation ends (by Flower's backend), also after an error."""
    from flwr.simulation import run_simulation

    check_client_app_ref(client_app_ref)
    plan = study_plan(study)
    _engine_environment()
    _quiet_deprecation()
    import ray

    ours = not ray.is_initialized()
    try:
        with fedrad_starts_ray(plan), linear_dispatch():
            run_simulation(
                server_app=server_app,
                client_app=LazyClientApp(client_app_ref),
                num_supernodes=study.federation.num_hospitals,
                backend_config=plan.backend_config(),  # type: ignore[arg-type]
            )
    finally:
        if ours:
            stop_ray()
