"""Code approval: only app bundles the hospital approved run; a modified bundle is refused before it runs."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.cli.install import install_from_fab as flower_install
from flwr.supercore.fab import Fab

from fedrad.client.cli import main as node_main
from fedrad.client.governance.approval import (
    AppAllowList,
    AppApprovalSettings,
    AppNotApproved,
    fab_hash,
    inspect_fab,
    verify_app,
)
from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime import gate
from fedrad.client.runtime.node_config import NODE_CONFIG_KEY
from fedrad.common.errors import ConfigError, FedradError, PolicyViolation
from fedrad.common.protocol import ERR_POLICY

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedradstudy"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "coordinator"

[tool.flwr.app.components]
serverapp = "fedrad.server.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
"""


def _fab(*, clientapp: str = "fedrad.client.runtime.app:app", files: dict[str, bytes] | None = None) -> bytes:
    """A Flower app bundle, built the way ``flwr build`` builds one."""
    content, _ = build_fab_from_files({"pyproject.toml": PYPROJECT.format(clientapp=clientapp).encode(), **(files or {})})
    return content


GOOD = _fab(files={"fedradstudy/task.py": b"LR = 0.1\n"})
MODIFIED = _fab(files={"fedradstudy/task.py": b"LR = 0.1\nimport os; os.system('exfiltrate')\n"})


@pytest.fixture(autouse=True)
def _no_gate_marker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The gate marks the process environment on approval; keep that from leaking between tests.
    Flower's home is the test's own (the gate removes folders there)."""
    monkeypatch.setenv(gate.GATE_APPROVED_ENV, "")
    monkeypatch.delenv(gate.GATE_APPROVED_ENV)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture()
def allow(tmp_path: Path) -> AppAllowList:
    a = AppAllowList.for_state_dir(tmp_path / "state")
    a.approve(digest=fab_hash(GOOD), by="dr-review", note="IRB-2026-17", info=inspect_fab(GOOD))
    return a


def test_bundle_hash_is_flowers_and_any_change_changes_it() -> None:
    import hashlib

    assert fab_hash(GOOD) == hashlib.sha256(GOOD).hexdigest() != fab_hash(MODIFIED)
    info = inspect_fab(GOOD)
    assert (info.publisher, info.name, info.version, info.clientapp) == ("coordinator", "fedradstudy", "1.0.0",
                                                                        "fedrad.client.runtime.app:app")
    assert info.code_files == ("fedradstudy/task.py",)


def test_approved_bundle_accepted_modified_bundle_refused(allow: AppAllowList) -> None:
    assert verify_app(fab_content=GOOD, claimed_hash=fab_hash(GOOD), allow_list=allow) == fab_hash(GOOD)
    with pytest.raises(AppNotApproved) as err:
        verify_app(fab_content=MODIFIED, claimed_hash=fab_hash(MODIFIED), allow_list=allow)
    assert isinstance(err.value, PolicyViolation) and err.value.rule == "app_approval"
    assert fab_hash(MODIFIED) in str(err.value) and "not approved" in str(err.value)


def test_bundle_whose_bytes_do_not_match_the_announced_hash_is_refused(allow: AppAllowList) -> None:
    with pytest.raises(AppNotApproved, match="hash to"):
        verify_app(fab_content=MODIFIED, claimed_hash=fab_hash(GOOD), allow_list=allow)


def test_approval_required_by_default_and_empty_list_refuses_everything(tmp_path: Path) -> None:
    assert AppApprovalSettings().require_approval
    with pytest.raises(AppNotApproved):
        verify_app(fab_content=GOOD, claimed_hash=None, allow_list=AppAllowList(tmp_path / "none.json"))


def test_revoked_approval_refuses_and_history_is_kept(allow: AppAllowList) -> None:
    digest = fab_hash(GOOD)
    allow.revoke(digest=allow.resolve(digest[:10]), by="dpo", reason="superseded")
    with pytest.raises(AppNotApproved):
        verify_app(fab_content=GOOD, claimed_hash=digest, allow_list=allow)
    (rec,) = allow.records()
    assert rec["approved_by"] == "dr-review" and rec["revoked_by"] == "dpo" and rec["revoked_at"]
    assert rec["name"] == "fedradstudy" and rec["note"] == "IRB-2026-17"
    again = allow.approve(digest=digest, by="dr-review")
    assert again["revoked_at"] is None and len(allow.records()) == 2
    assert allow.approve(digest=digest, by="someone-else")["approved_by"] == "dr-review"  # idempotent


def test_unreadable_allow_list_fails_closed(allow: AppAllowList) -> None:
    allow.path.write_text("{not json")
    with pytest.raises(AppNotApproved, match="refusing every app"):
        verify_app(fab_content=GOOD, claimed_hash=None, allow_list=allow)
    with pytest.raises(ConfigError):
        allow.approve(digest=fab_hash(GOOD), by="x")


def test_allow_list_is_written_atomically_and_private(allow: AppAllowList) -> None:
    assert oct(allow.path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in allow.path.parent.iterdir() if p.name.endswith(".tmp")]
    data = json.loads(allow.path.read_text())
    assert data["version"] == 1 and data["apps"][0]["fab_hash"] == fab_hash(GOOD)


def test_installed_code_only_refuses_bundles_that_carry_code(allow: AppAllowList) -> None:
    strict = AppApprovalSettings(installed_code_only=True)
    with pytest.raises(AppNotApproved, match="carries code"):  # even though approved
        verify_app(fab_content=GOOD, claimed_hash=None, allow_list=allow, settings=strict)
    other = _fab(clientapp="evil.client:app")
    with pytest.raises(AppNotApproved, match="runs only 'fedrad.client.runtime.secagg_app:app' or 'fedrad.client.runtime.app:app'"):
        verify_app(fab_content=other, claimed_hash=None, allow_list=allow,
                   settings=AppApprovalSettings(installed_code_only=True, require_approval=False))
    config_only = _fab(files={"README.md": b"# study\n"})
    verify_app(fab_content=config_only, claimed_hash=None, allow_list=allow,
               settings=AppApprovalSettings(installed_code_only=True, require_approval=False))
    with pytest.raises(AppNotApproved, match="not approved"):  # both rules apply by default
        verify_app(fab_content=config_only, claimed_hash=None, allow_list=allow, settings=strict)


# ---------------------------------------------------------------------------- the gate in flwr-clientapp
@pytest.fixture()
def node_yaml(tmp_path: Path, allow: AppAllowList) -> Path:
    p = tmp_path / "node.yaml"
    p.write_text("site: hospital-a\nsuperlink: 127.0.0.1:9092\ninsecure: true\ndata: {path: site.npz}\n"
                 "state_dir: state\n")
    return p


def _fake_runner(fab: bytes, node_yaml: Path, calls: list[str]) -> SimpleNamespace:
    """Stands in for ``flwr.supernode.runtime.run_clientapp``: records which Flower steps ran."""
    context = Context(run_id=7, node_id=1, node_config={NODE_CONFIG_KEY: str(node_yaml)}, state=RecordDict(),
                      run_config={})
    run = SimpleNamespace(fab_id="coordinator/fedradstudy", fab_version="1.0.0", fab_hash=fab_hash(fab))
    msg = Message(content=RecordDict({"config": ConfigRecord({"study-id": "s-1", "server-round": 3})}),
                  metadata=Metadata(run_id=7, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=1,
                                    reply_to_message_id="", group_id="3", created_at=time.time(), ttl=3600,
                                    message_type=MessageType.TRAIN))

    def pull_task_input(client: Any) -> tuple[Any, ...]:
        calls.append("pull")
        return msg, context, run, Fab(fab_hash(fab), fab, {})

    def install_from_fab(content: bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        calls.append("install")  # Flower's own unpacking (the gate names the folder)
        return flower_install(content, install_dir=install_dir, skip_prompt=skip_prompt)

    def get_load_client_app_fn(**kwargs: Any) -> Any:
        calls.append("loader")
        return lambda *a: "THE COORDINATOR'S APP"

    def install_app_dependencies(*a: Any, **k: Any) -> None:
        calls.append("deps")

    return SimpleNamespace(__name__="fake_runner", pull_task_input=pull_task_input, install_from_fab=install_from_fab,
                           get_load_client_app_fn=get_load_client_app_fn,
                           install_app_dependencies=install_app_dependencies)


def _drive(runner: SimpleNamespace) -> tuple[Any, Any, Any]:
    """The steps of Flower's ``run_clientapp``, in its order."""
    message, context, run, fab = runner.pull_task_input(None)
    runner.install_from_fab(fab.content, skip_prompt=True)
    runner.install_app_dependencies(Path("/nonexistent"))
    app = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)
    return app, message, context


def test_gate_never_installs_or_loads_an_unapproved_bundle(node_yaml: Path) -> None:
    calls: list[str] = []
    runner = _fake_runner(MODIFIED, node_yaml, calls)
    gate.install_gate(runner)
    app, message, context = _drive(runner)
    assert calls == ["pull"]  # Flower's install, dependency install and loader never ran
    reply = app(message=message, context=context)
    assert reply.has_error() and reply.error.code == ERR_POLICY
    assert "app_approval" in reply.error.reason and fab_hash(MODIFIED) in reply.error.reason
    log = AuditLog(node_yaml.parent / "state" / "audit.jsonl", key_file=node_yaml.parent / "audit.key")
    assert log.verify() == []  # keyed by the node's key beside node.yaml
    (entry,) = log.entries()
    assert entry["outcome"].startswith("refused: rule app_approval") and entry["study"] == "s-1"
    assert entry["round"] == 3 and entry["arrays"] == [] and entry["policy_version"]


def test_gate_lets_an_approved_bundle_through(node_yaml: Path) -> None:
    calls: list[str] = []
    runner = _fake_runner(GOOD, node_yaml, calls)
    gate.install_gate(runner)
    app, _, _ = _drive(runner)
    assert calls == ["pull", "install", "loader"] and app == "THE COORDINATOR'S APP"  # never dependency installs


def test_gate_fails_closed(node_yaml: Path, tmp_path: Path) -> None:
    with pytest.raises(AppNotApproved, match="cannot gate"):
        gate.install_gate(SimpleNamespace(__name__="other_flower", pull_task_input=lambda c: None))
    calls: list[str] = []
    runner = _fake_runner(GOOD, tmp_path / "missing-node.yaml", calls)  # no node configuration: refuse all
    gate.install_gate(runner)
    app, message, context = _drive(runner)
    assert calls == ["pull"] and app(message=message, context=context).error.code == ERR_POLICY
    calls.clear()
    runner = _fake_runner(GOOD, node_yaml, calls)
    gate.install_gate(runner)
    assert runner.install_from_fab(GOOD) is not None and calls == []  # install before any check: refused


def test_flower_runner_still_has_the_calls_the_gate_wraps() -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    src = inspect.getsource(runner.run_clientapp)
    for name in gate.GATED_CALLS:
        assert callable(getattr(runner, name)) and f"{name}(" in src, name
    assert src.index("pull_task_input(") < src.index("install_from_fab(") < src.index("load_client_app_fn(")
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == gate.CLIENTAPP_COMMAND  # what SuperExec starts via PATH


def test_shim_is_what_superexec_finds_on_path(tmp_path: Path, node_yaml: Path) -> None:
    bin_dir = tmp_path / "state" / "bin"
    shim = gate.write_shim(bin_dir)
    env = gate.gated_env(bin_dir=bin_dir, node_config=node_yaml)
    gate.check_gated(env, bin_dir=bin_dir)
    with pytest.raises(Exception, match="not the node's gate"):
        gate.check_gated(dict(os.environ), bin_dir=bin_dir)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert shim.read_text().startswith(f"#!{sys.executable}\n")
    out = subprocess.run(["flwr-clientapp", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--runtime-api-address" in out.stdout
    assert (bin_dir / gate.SUPEREXEC_COMMAND).read_text().startswith(f"#!{sys.executable}\n")


def test_node_superexec_starts_only_the_gate_by_absolute_path(tmp_path: Path, monkeypatch) -> None:
    from flwr.supercore import cli
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    bin_dir = tmp_path / "bin"
    for task_type, command in list(TASK_TYPE_TO_COMMAND.items()):  # put back what superexec_main changes
        monkeypatch.setitem(TASK_TYPE_TO_COMMAND, task_type, command)
    monkeypatch.setattr(AutoExecPlugin, "supported_task_types", AutoExecPlugin.supported_task_types)
    monkeypatch.setattr(AutoExecPlugin, "visible_output_task_types", AutoExecPlugin.visible_output_task_types)
    monkeypatch.setattr(cli, "flower_superexec", lambda: None)  # Flower's loop itself is not under test
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    assert gate.superexec_main(bin_dir) == 1  # no gate there yet: refuses to start (fails closed)
    gate.write_shim(bin_dir)
    assert gate.superexec_main(bin_dir) == 0

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == str((bin_dir / gate.CLIENTAPP_COMMAND).resolve())
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bin_dir.resolve())


def test_supernode_process_puts_the_gate_first_again(tmp_path: Path, node_yaml: Path, monkeypatch) -> None:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    monkeypatch.setattr(InMemoryNodeState, "create_task", InMemoryNodeState.create_task)  # regate_path wraps it
    bin_dir = tmp_path / "state" / "bin"
    gate.write_shim(bin_dir)
    env = gate.gated_env(bin_dir=bin_dir, node_config=node_yaml)
    hostile = tmp_path / "hostile"  # what a wrapper (pyenv's shims) may put first after gated_env
    hostile.mkdir()
    for name in (gate.CLIENTAPP_COMMAND, gate.SUPEREXEC_COMMAND):
        (hostile / name).write_text("#!/bin/sh\nexit 0\n")
        (hostile / name).chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(hostile), env["PATH"]]))
    monkeypatch.setenv(gate.GATE_BIN_ENV, env[gate.GATE_BIN_ENV])

    gate.regate_path()

    gate.check_gated(os.environ, bin_dir=bin_dir)
    monkeypatch.delenv(gate.GATE_BIN_ENV)
    with pytest.raises(FedradError, match="fedrad-node start"):
        gate.regate_path()


# ---------------------------------------------------------------------------- fedrad-node apps
def test_apps_cli_approve_list_check_revoke(tmp_path: Path, node_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.fab", tmp_path / "bad.fab"
    good.write_bytes(GOOD)
    bad.write_bytes(MODIFIED)
    cfg = ["--config", str(node_yaml)]
    assert node_main(["apps", "check", *cfg, str(good)]) == 0
    assert node_main(["apps", "check", *cfg, str(bad)]) == 8
    assert "not approved" in capsys.readouterr().err
    assert node_main(["apps", "approve", *cfg, "--hash", fab_hash(MODIFIED), "--by", "alice", "--note", "rev 2"]) == 0
    assert node_main(["apps", "check", *cfg, str(bad)]) == 0
    assert node_main(["apps", "list", *cfg]) == 0
    assert fab_hash(MODIFIED)[:16] in capsys.readouterr().out
    assert node_main(["apps", "revoke", *cfg, fab_hash(MODIFIED)[:12], "--by", "bob"]) == 0
    assert node_main(["apps", "check", *cfg, str(bad)]) == 8
    assert node_main(["apps", "approve", *cfg, "--hash", "xyz"]) == 2  # a clear configuration error
    assert node_main(["apps", "list", *cfg, "--all"]) == 0
    fresh = tmp_path / "fresh.json"
    assert node_main(["apps", "approve", "--allow-list", str(fresh), str(good)]) == 0
    (rec,) = json.loads(fresh.read_text())["apps"]
    assert rec["fab_hash"] == fab_hash(GOOD) and rec["name"] == "fedradstudy" and rec["approved_by"]


def test_fedrad_app_refuses_to_work_outside_the_gate(node_yaml: Path) -> None:
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                        run_config={})
    gate.require_gate(context=simulated)  # simulation: no bundle, nothing to check
    deployed = Context(run_id=1, node_id=1, node_config={NODE_CONFIG_KEY: str(node_yaml)}, state=RecordDict(),
                       run_config={})
    with pytest.raises(AppNotApproved, match="without the node's app-approval gate"):
        gate.require_gate(context=deployed)
    runner = _fake_runner(GOOD, node_yaml, [])
    gate.install_gate(runner)
    _drive(runner)  # the gate approves GOOD and marks the process
    assert os.environ[gate.GATE_APPROVED_ENV] == fab_hash(GOOD)
    gate.require_gate(context=deployed)
