"""Security review finding 1: no task type but a ClientApp's runs on a node (Flower's AgentApp path).

In Flower 1.41 the coordinator's Run chooses the task type (``primary_task_type``): for an AgentApp
run the SuperNode creates ``flwr-agentapp`` tasks and SuperExec's ``AutoExecPlugin``, which accepts
every task type, starts ``flwr-agentapp`` from ``PATH``: it unpacks the bundle and imports its code,
never passing the gate. These tests drive Flower's real plugin, executor and node state, once as
Flower ships them (the attack works) and once restricted by the node's gate (it does not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus
from flwr.supercore.superexec.plugin import base_exec_plugin
from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from fedrad.client.runtime import gate

OTHER_TYPES = [t for t in TaskType if t != TaskType.CLIENT_APP]


@pytest.fixture()
def flower_as_shipped(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test changes in Flower's module state is put back afterwards."""
    for task_type, command in list(TASK_TYPE_TO_COMMAND.items()):
        monkeypatch.setitem(TASK_TYPE_TO_COMMAND, task_type, command)
    monkeypatch.setattr(AutoExecPlugin, "supported_task_types", AutoExecPlugin.supported_task_types)
    monkeypatch.setattr(AutoExecPlugin, "visible_output_task_types", AutoExecPlugin.visible_output_task_types)
    monkeypatch.setattr(InMemoryNodeState, "create_task", InMemoryNodeState.create_task)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    yield


@pytest.fixture()
def agentapp_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stands in for Flower's ``flwr-agentapp`` (which would unpack the bundle and import its code):
    it writes the returned marker when run."""
    marker = tmp_path / "BUNDLE-CODE-RAN"
    fake = tmp_path / "flower-bin"
    fake.mkdir()
    script = fake / "flwr-agentapp"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {marker}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake), os.environ["PATH"]]))
    return marker


def _spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9", token="t0ken", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=7)


def _launch_and_wait(monkeypatch: pytest.MonkeyPatch, plugin_or_executor: Any, arg: Any) -> tuple[Any, list[int]]:
    """Launch through Flower's real SubprocessExecutor and wait (bounded) for what it started."""
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", popen)
    if isinstance(plugin_or_executor, AutoExecPlugin):
        result = plugin_or_executor.launch_task("t0ken", arg)
    else:
        result = plugin_or_executor.launch(arg)
    return result, [p.wait(timeout=60) for p in started]


def _node_state() -> InMemoryNodeState:
    """The SuperNode's state as ``flower-supernode`` makes it."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    state = NodeStateFactory(ObjectStoreFactory()).state()
    assert isinstance(state, InMemoryNodeState)
    return state


def _plugin() -> AutoExecPlugin:
    return AutoExecPlugin(runtime_api_address="127.0.0.1:9", insecure=True, root_certificates_path=None,
                          runtime_dependency_install=False, executor=SubprocessExecutor())


def test_as_flower_ships_an_agentapp_task_runs_the_ungated_command(
        flower_as_shipped: None, agentapp_on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack, against Flower alone: it is real, so the tests below can fail."""
    task = Task(task_id=7, type=TaskType.AGENT_APP, run_id=1, fab_hash="ab" * 32)

    result, codes = _launch_and_wait(monkeypatch, _plugin(), task)

    assert result.status == LaunchResultStatus.ACCEPTED and codes == [0]
    assert agentapp_on_path.exists()
    state = _node_state()
    assert state.create_task(task_type=TaskType.AGENT_APP, run_id=1, fab_hash="ab" * 32) is not None


def test_node_superexec_points_every_other_task_type_at_a_refusal(
        flower_as_shipped: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore import cli

    bin_dir = tmp_path / "bin"
    monkeypatch.setattr(cli, "flower_superexec", lambda: None)  # Flower's loop itself is not under test
    gate.write_shim(bin_dir)
    (bin_dir / gate.REFUSE_COMMAND).unlink()
    assert gate.superexec_main(bin_dir) == 1  # no refusal command: refuses to start (fails closed)
    gate.write_shim(bin_dir)

    assert gate.superexec_main(bin_dir) == 0

    refuse = str((bin_dir / gate.REFUSE_COMMAND).resolve())
    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == str((bin_dir / gate.CLIENTAPP_COMMAND).resolve())
    assert {t: TASK_TYPE_TO_COMMAND[t] for t in OTHER_TYPES} == {t: refuse for t in OTHER_TYPES}
    assert set(TASK_TYPE_TO_COMMAND) >= set(TaskType)
    assert AutoExecPlugin.supported_task_types == frozenset({TaskType.CLIENT_APP})
    assert base_exec_plugin.AutoExecPlugin is AutoExecPlugin  # what run_superexec instantiates
    for task_type in OTHER_TYPES:  # the command itself refuses, whatever arguments it gets
        t0 = time.monotonic()
        out = subprocess.run([TASK_TYPE_TO_COMMAND[task_type], "--runtime-api-address", "127.0.0.1:9", "--token",
                              "t0ken", "--insecure"], capture_output=True, text=True, timeout=60)
        assert out.returncode == gate.REFUSED_EXIT, task_type
        assert "ClientApp tasks only" in out.stderr and time.monotonic() - t0 < 60


def test_agentapp_task_cannot_run_bundle_code_behind_the_node_superexec(
        flower_as_shipped: None, agentapp_on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    gate.write_shim(bin_dir)
    gate.restrict_superexec(gate_path=(bin_dir / gate.CLIENTAPP_COMMAND).resolve(),
                            refuse_path=(bin_dir / gate.REFUSE_COMMAND).resolve())
    plugin = _plugin()

    for task_type in OTHER_TYPES:  # the plugin never takes such a task...
        result, codes = _launch_and_wait(monkeypatch, plugin, Task(task_id=7, type=task_type, run_id=1,
                                                                   fab_hash="ab" * 32))
        assert result.status == LaunchResultStatus.FAILED and codes == [], task_type
    # ... and were one launched anyway, what starts is the refusal, not Flower's command on PATH
    result, codes = _launch_and_wait(monkeypatch, SubprocessExecutor(), _spec(TaskType.AGENT_APP))
    assert codes == [gate.REFUSED_EXIT]
    assert not agentapp_on_path.exists()


def test_node_supernode_creates_clientapp_tasks_only(flower_as_shipped: None) -> None:
    """The SuperNode side: an AgentApp run (``primary_task_type``) gets no task at all."""
    gate.restrict_supernode()
    gate.restrict_supernode()  # idempotent
    state = _node_state()

    for task_type in OTHER_TYPES:
        assert state.create_task(task_type=task_type, run_id=1, fab_hash="ab" * 32) is None, task_type
    assert state.create_task(TaskType.AGENT_APP, 1, "ab" * 32) is None  # positional too
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=1, fab_hash="ab" * 32)
    assert isinstance(task_id, int) and [t.type for t in state.get_tasks(task_ids=[task_id])] == [TaskType.CLIENT_APP]


def test_supernode_process_restriction_is_part_of_regating(flower_as_shipped: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    gate.write_shim(bin_dir)
    env = gate.gated_env(bin_dir=bin_dir, node_config=tmp_path / "node.yaml")
    monkeypatch.setenv(gate.GATE_BIN_ENV, env[gate.GATE_BIN_ENV])

    gate.regate_path()

    assert _node_state().create_task(task_type=TaskType.AGENT_APP, run_id=1, fab_hash="ab" * 32) is None
