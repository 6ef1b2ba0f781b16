"""The simulation's message dispatch (fedrad.server.engine): every message pushed for a simulated
hospital reaches the actors' queue exactly once, marked delivered, and a sweep asks Flower's link
state only about the hospitals that have a message waiting (Flower's own loop asks every hospital,
each question scanning every stored message: quadratic in the number of hospitals)."""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedrad.server.engine import _dispatch_messages, linear_dispatch


class CountingState:
    """Flower's in-memory link state, counting the per-node queries made of it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_message_ins(self, *, node_id: int, limit: int | None) -> list[Message]:
        self.queries += 1
        return self._inner.get_message_ins(node_id=node_id, limit=limit)


def _federation(n: int) -> tuple[Any, dict[int, int], InMemoryGrid]:
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=4242)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 1
    state.run_ids[4242] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=4242)
    mapping = _register_nodes(n, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


def _drain(queue: Queue[Message], want: int, deadline_s: float) -> list[Message]:
    got: list[Message] = []
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        try:
            got.append(queue.get(timeout=0.05))
        except Empty:
            pass
    return got


def test_each_pushed_message_is_dispatched_once_and_only_waiting_nodes_are_asked() -> None:
    # arrange: 100 hospitals, a message for 30 of them
    state, mapping, grid = _federation(100)
    targets = list(mapping)[:30]
    pushed = set(grid.push_messages([Message(RecordDict({"c": ConfigRecord({"k": 1})}), dst_node_id=nid,
                                             message_type="train") for nid in targets]))
    counting, queue, stop = CountingState(state), Queue(), threading.Event()
    # act: the dispatcher runs for a few sweeps
    worker = threading.Thread(target=_dispatch_messages, args=(counting, queue, mapping, stop))
    worker.start()
    got = _drain(queue, len(pushed), deadline_s=10.0)
    time.sleep(0.35)  # more sweeps with nothing waiting
    stop.set()
    worker.join(timeout=5)
    # assert
    assert sorted(m.metadata.message_id for m in got) == sorted(pushed)
    assert {m.metadata.dst_node_id for m in got} == set(targets)
    assert all(m.metadata.delivered_at for m in got)
    assert queue.empty()
    assert counting.queries == len(targets)  # Flower's loop: 100 per sweep


def test_the_dispatcher_replaces_flowers_loop_only_inside_the_context() -> None:
    original = vce_api.add_messages_to_queue
    with linear_dispatch() as active:
        assert active and vce_api.add_messages_to_queue is _dispatch_messages
    assert vce_api.add_messages_to_queue is original
