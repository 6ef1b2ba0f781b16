"""The simulation engine's use of the machine: how many ClientApp actors start for N hospitals on C
cores, and that Flower's actor pool (its own sizing formula) comes out at exactly that number."""

from __future__ import annotations

import pickle
import time

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from fedrad.common.errors import FederationError
from fedrad.server.engine import LazyClientApp, check_client_app_ref, engine_plan


def _flower_pool_size(plan_cpus: int, client_cpus: float) -> int:
    """Flower 1.41's ``pool_size_from_resources`` for one node, with Ray's four-decimal resources."""
    return int(plan_cpus / round(client_cpus, 4))


@pytest.mark.parametrize(
    ("hospitals", "client_cpus", "cores", "actors"),
    [
        (3, 1.0, 2, 2),      # the demo on the 2-core machine
        (100, 1.0, 2, 2),    # hospitals take turns: never one process per hospital
        (1, 1.0, 2, 1),      # no idle actor beyond the hospitals
        (3, 0.5, 2, 3),      # a fractional share: one actor per hospital, still within the cores
        (10, 0.5, 2, 4),
        (3, 1.5, 2, 1),
        (3, 4.0, 2, 1),      # more CPUs per hospital than the machine has: one actor
        (30, 1.0, 16, 16),
    ],
)
def test_actors_fit_the_cores_and_never_exceed_the_hospitals(hospitals: int, client_cpus: float, cores: int,
                                                            actors: int) -> None:
    # act
    plan = engine_plan(num_hospitals=hospitals, client_cpus=client_cpus, client_gpus=0.0, cores=cores)
    # assert
    assert plan.actors == actors
    assert plan.ray_cpus <= cores and isinstance(plan.ray_cpus, int)
    assert _flower_pool_size(plan.ray_cpus, plan.client_cpus) == actors
    config = plan.backend_config()
    assert config["client_resources"] == {"num_cpus": plan.client_cpus, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == plan.ray_cpus and config["init_args"]["include_dashboard"] is False


def test_a_plan_without_hospitals_or_cores_is_refused() -> None:
    with pytest.raises(FederationError):
        engine_plan(num_hospitals=0, client_cpus=1.0, client_gpus=0.0, cores=2)


def test_the_lazy_client_app_ships_only_its_reference_and_runs_the_named_app() -> None:
    # arrange: a ClientApp in this test module, named by reference
    lazy = LazyClientApp(f"{__name__}:ECHO_APP")
    # act: as Ray ships it to an actor, then a message arrives
    shipped = pickle.loads(pickle.dumps(lazy))
    reply = shipped(_query(), _context())
    # assert
    assert pickle.dumps(lazy).count(b"ECHO_APP") == 1 and len(pickle.dumps(lazy)) < 300
    assert reply.metadata.message_type == "query" and CALLS == [1]


def test_a_missing_client_app_module_is_refused_before_anything_starts() -> None:
    with pytest.raises(FederationError, match="not found"):
        check_client_app_ref("fedrad.no_such_module:app")
    with pytest.raises(FederationError, match="module:attribute"):
        check_client_app_ref("fedrad.client.runtime.app")
    check_client_app_ref("fedrad.client.runtime.app:app")  # found without importing it


CALLS: list[int] = []
ECHO_APP = ClientApp()


@ECHO_APP.query()
def _echo(msg: Message, context: Context) -> Message:
    CALLS.append(1)
    return Message(RecordDict(), reply_to=msg)


def _query() -> Message:
    md = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                  created_at=time.time(), ttl=60.0, message_type="query")
    return Message(content=RecordDict(), metadata=md)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.slow
def test_starting_ray_keeps_the_signal_handlers_in_force() -> None:
    # arrange: fedrad's handlers (stop at a safe point) are installed before the engine starts Ray
    import signal

    from fedrad.server.engine import start_ray, stop_ray

    def handler(signum: int, frame: object) -> None:  # pragma: no cover - never delivered
        pass

    before = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # act
        started = start_ray(engine_plan(num_hospitals=1, client_cpus=1.0, client_gpus=0.0, cores=1))
        # assert: Ray's own SIGTERM handler (exit at once) did not replace fedrad's
        assert started
        assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGINT) is handler
    finally:
        stop_ray()
        for sig, old in before.items():
            signal.signal(sig, old)
