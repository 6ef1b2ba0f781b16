"""Object pulls of a message still being uploaded wait in short steps (issue 14).

Flower 1.41 lists a message to its receiver before the sender has pushed its objects; the
receiver's pulls then back off 1 s, doubling to 10 s, per object. fedrad's SuperNode and
ServerApp retry after 0.05-0.5 s instead, and the SuperNode holds its task process's pulls until
the objects arrive. These tests use Flower's own pull loop and the node's real launcher.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedrad.client.runtime import node as node_mod
from fedrad.client.runtime.gate import gated_env, write_shim
from fedrad.common.quick_pulls import quick_pulls_enabled, quicken_pulls
from fedrad.server import deploy_grid


def _module_with_flowers_puller() -> types.ModuleType:
    mod = types.ModuleType("fake_flower_module")
    mod.pull_objects = inflatable_utils.pull_objects  # type: ignore[attr-defined]
    return mod


def test_quickened_puller_retries_in_short_steps_and_still_returns_the_objects() -> None:
    # arrange: an object that is "not uploaded yet" for its first 3 tries (Flower would sleep
    # about 1 + 2 + 4 s before the 4th)
    mod = _module_with_flowers_puller()
    quicken_pulls(mod)
    tries: dict[str, int] = {"a": 0, "b": 0}

    def pull(object_id: str) -> bytes:
        tries[object_id] += 1
        if object_id == "a" and tries["a"] <= 3:
            raise ObjectUnavailableError(object_id)
        return object_id.encode() * 3

    # act
    got = mod.pull_objects(["a", "b"], pull)

    # assert: same result, same patience (no per-object try limit of 500 x 0.5 s), short pauses
    assert got == {"a": b"aaa", "b": b"bbb"} and tries == {"a": 4, "b": 1}
    assert mod.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": None}
    quicken_pulls(mod)  # a second call changes nothing
    assert mod.pull_objects.func is inflatable_utils.pull_objects


def _handlers(store: dict[str, bytes]) -> types.ModuleType:
    """A SuperNode Runtime API handler module over ``store`` (b"" = preregistered, not received yet)."""
    mod = types.ModuleType("fake_runtime_handlers")
    calls: list[str] = []

    def pull_object(request: Any, state: Any, task: Any) -> PullObjectResponse:
        calls.append(request.object_id)
        content = store.get(request.object_id)
        if content is None:
            return PullObjectResponse(object_found=False, object_available=False)
        return PullObjectResponse(object_found=True, object_available=content != b"", object_content=content)

    mod.pull_object = pull_object  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


def test_supernode_holds_a_task_pull_until_the_object_arrives() -> None:
    # arrange: the object is preregistered; the node "receives" it a little later
    store = {"obj": b""}
    mod = _handlers(store)
    node_mod.hold_unavailable_objects(mod, hold_s=20.0, step_s=0.01)
    arrive = threading.Timer(0.3, lambda: store.update(obj=b"payload"))
    arrive.start()
    try:
        # act
        res = mod.pull_object(types.SimpleNamespace(object_id="obj"), None, None)
    finally:
        arrive.cancel()
    # assert: one answer, with the content (the task process never sees "not yet")
    assert res.object_found and res.object_available and res.object_content == b"payload"
    assert len(mod.calls) > 1


def test_supernode_answers_unknown_objects_at_once_and_gives_up_holding_after_the_limit() -> None:
    mod = _handlers({"late": b""})
    node_mod.hold_unavailable_objects(mod, hold_s=0.2, step_s=0.01)

    unknown = mod.pull_object(types.SimpleNamespace(object_id="nope"), None, None)
    late = mod.pull_object(types.SimpleNamespace(object_id="late"), None, None)

    assert not unknown.object_found and mod.calls.count("nope") == 1
    assert late.object_found and not late.object_available  # "not yet": the task process retries


def test_run_supernode_patches_flowers_supernode_before_starting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import cli, start_client_internal
    from flwr.supernode.servicer.runtime import runtime_handlers

    # restore Flower's modules after the test, whatever run_supernode changed
    for mod, names in ((start_client_internal, ("pull_objects", "time", "_fedrad_quick_pulls", "_fedrad_timed",
                                                "_pull_and_store_message", "push_object_contents_from_iterable")),
                       (runtime_handlers, ("pull_object", "_fedrad_hold"))):
        for name in names:
            monkeypatch.setattr(mod, name, getattr(mod, name, None), raising=False)
    seen: dict[str, Any] = {}

    def fake_supernode() -> None:  # what Flower would start: record what it would run with
        seen["pull_objects"] = start_client_internal.pull_objects
        seen["pull_object"] = runtime_handlers.pull_object
        seen["argv"] = list(sys.argv)

    monkeypatch.setattr(cli, "flower_supernode", fake_supernode)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    original_handler = runtime_handlers.pull_object

    node_mod.run_supernode(["--insecure"], poll_interval_s=0.25)

    assert seen["argv"] == ["flower-supernode", "--insecure"]
    assert seen["pull_objects"].keywords["initial_backoff"] == 0.05
    assert seen["pull_object"] is not original_handler
    assert start_client_internal._fedrad_timed  # the message hops are timed in the node's log


def test_message_hops_are_logged_with_their_durations(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[Any] = []
    fake = types.SimpleNamespace(_pull_and_store_message=lambda **kw: kw["answer"],
                                 push_object_contents_from_iterable=lambda items, push_object_fn: sent.extend(items))
    node_mod.time_message_hops(fake)  # type: ignore[arg-type]

    with caplog.at_level("INFO", logger=node_mod.__name__):
        assert fake._pull_and_store_message(answer=None) is None  # no message: nothing logged
        assert fake._pull_and_store_message(answer=42) == 42
        fake.push_object_contents_from_iterable([("id", b"x")], push_object_fn=print)

    assert sent == [("id", b"x")]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("message received from the coordinator in ")
    assert lines[1].startswith("reply sent to the coordinator in ")


def test_quick_pulls_switch() -> None:
    assert quick_pulls_enabled({}) and quick_pulls_enabled({"FEDRAD_QUICK_PULLS": "1"})
    assert not quick_pulls_enabled({"FEDRAD_QUICK_PULLS": "0"})


@pytest.mark.parametrize("switch, expected", [(None, True), ("0", False)])
def test_fast_poll_grid_quickens_the_deployment_grids_reply_pulls(monkeypatch: pytest.MonkeyPatch,
                                                                  switch: str | None, expected: bool) -> None:
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    monkeypatch.setattr(http_grid, "_fedrad_quick_pulls", False, raising=False)
    if switch is None:
        monkeypatch.delenv("FEDRAD_QUICK_PULLS", raising=False)
    else:
        monkeypatch.setenv("FEDRAD_QUICK_PULLS", switch)

    grid = deploy_grid.FastPollGrid(types.SimpleNamespace(), interval=0.25)  # type: ignore[arg-type]

    assert grid.quick_pulls is expected
    assert isinstance(http_grid.pull_objects, functools.partial) is expected


@pytest.mark.parametrize("switch, expected", [(None, True), ("0", False)])
def test_the_launched_supernode_process_gets_quick_pulls_unless_switched_off(tmp_path: Path, switch: str | None,
                                                                             expected: bool) -> None:
    # arrange: the environment fedrad-node start gives its SuperNode process (gate first on PATH)
    bin_dir = tmp_path / "bin"
    write_shim(bin_dir)
    (tmp_path / "node.yaml").write_text("site: x\n")
    env = gated_env(bin_dir=bin_dir, node_config=tmp_path / "node.yaml")
    env["PATH"] = os.pathsep.join([str(bin_dir.resolve()), str(Path(sys.executable).parent), env["PATH"]])
    env.pop("FEDRAD_QUICK_PULLS", None)
    if switch is not None:
        env["FEDRAD_QUICK_PULLS"] = switch

    # act: the SuperNode process fedrad-node start runs, asked only for Flower's help (starts nothing)
    out = subprocess.run([sys.executable, "-m", "fedrad.client.commands.node", "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)

    # assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("object pulls: retry after 0.05-0.50s" in out.stderr + out.stdout) is expected


# -- the SuperLink keeps message objects in memory, its runs and nodes in its database ---------


def test_superlink_command_runs_flower_superlink_through_fedrad(tmp_path: Path) -> None:
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(tmp_path)
    cmd = cdn.superlink_command(co, port=9999, insecure=True)
    assert cmd[:3] == [sys.executable, "-m", "fedrad.server.coordinator"]
    assert cmd[cmd.index("--database") + 1].endswith("state/superlink.db")


def test_superlink_object_store_setting() -> None:
    from fedrad.common.errors import FedradError
    from fedrad.server.coordinator import OBJECT_STORE_ENV, superlink_object_store

    assert superlink_object_store({}) == "memory"
    assert superlink_object_store({OBJECT_STORE_ENV: "database"}) == "database"
    with pytest.raises(FedradError, match=OBJECT_STORE_ENV):
        superlink_object_store({OBJECT_STORE_ENV: "disk"})


def test_superlink_keeps_objects_in_memory_and_its_state_in_the_database(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink import config_loader

    from fedrad.server.coordinator import keep_objects_in_memory

    monkeypatch.setattr(config_loader, "ObjectStoreFactory", config_loader.ObjectStoreFactory)
    monkeypatch.setattr(config_loader, "_fedrad_objects_in_memory", False, raising=False)
    db = tmp_path / "superlink.db"

    keep_objects_in_memory()  # what `python -m fedrad.server.coordinator` does before starting Flower's SuperLink
    objects, links = config_loader.get_objectstore_linkstate_factories(
        str(db), config_loader.get_federation_manager(is_simulation=False))
    state = links.state()

    assert isinstance(objects.store(), InMemoryObjectStore)
    assert type(state).__name__ == "SqlLinkState" and state.object_store is objects.store()
    assert db.exists()  # runs, nodes and messages stay on disk


def test_the_launched_superlink_process_keeps_objects_where_configured(tmp_path: Path) -> None:
    from fedrad.server.coordinator import OBJECT_STORE_ENV

    for value, expected in ((None, "memory"), ("database", "database")):
        env = {k: v for k, v in os.environ.items() if k != OBJECT_STORE_ENV}
        if value is not None:
            env[OBJECT_STORE_ENV] = value
        out = subprocess.run([sys.executable, "-m", "fedrad.server.coordinator", "--help"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"SuperLink message objects kept in {expected}" in out.stderr


def test_the_supernode_clock_cuts_coordinator_polls_and_its_own_waits_apart() -> None:
    slept: list[float] = []
    clock = node_mod._PollClock(0.25, local=0.05)
    real = node_mod.time.sleep
    try:
        node_mod.time.sleep = slept.append  # type: ignore[assignment]
        clock.sleep(3)  # Flower's poll of the coordinator
        clock.sleep(0.5)  # Flower's wait for the node's own task
        clock.sleep(0.01)
    finally:
        node_mod.time.sleep = real  # type: ignore[assignment]

    assert slept == [0.25, 0.05, 0.01]
    assert clock.monotonic is node_mod.time.monotonic  # everything else is the real time module


def test_quick_local_waits_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(node_mod.QUICK_LOCAL_WAITS_ENV, raising=False)
    assert node_mod.quick_local_waits()
    monkeypatch.setenv(node_mod.QUICK_LOCAL_WAITS_ENV, "0")
    assert not node_mod.quick_local_waits()
