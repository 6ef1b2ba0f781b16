"""Issue 9, point 5: the node runs exactly the code it approved, whatever lies in Flower's app folder.

Flower 1.41 loads a ClientApp from ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<8 hex>`` and
skips unpacking when that folder exists, reading the ClientApp reference from the folder's own
pyproject.toml. These tests place foreign code there (and elsewhere) and drive Flower's real
``install_from_fab`` and ``get_load_client_app_fn`` in the order ``run_clientapp`` calls them,
once without the gate (the attack works) and then behind the node's gate (it does not).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.cli.install import install_from_fab as flower_install
from flwr.clientapp.utils import get_load_client_app_fn as flower_loader
from flwr.supercore.fab import Fab

import fedrad.client.runtime.app as fedrad_app
from fedrad.client.cli import main as node_main
from fedrad.client.governance.app_folder import APP_DIR, flower_app_folder, folder_problems
from fedrad.client.governance.approval import AppAllowList, fab_hash, inspect_fab
from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime import gate
from fedrad.client.runtime.node_config import NODE_CONFIG_KEY
from fedrad.common.protocol import ERR_POLICY

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "fedrad.server.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
"""
EVIL = """from pathlib import Path
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("foreign code ran at import")
app = ClientApp()


@app.train()
def train(msg, context):
    Path({marker!r}).write_text("foreign code ran in train")
    raise SystemExit("stolen")
"""


def _fab(*, name: str = "fedradstudy", clientapp: str = "fedrad.client.runtime.app:app",
         files: dict[str, bytes] | None = None) -> bytes:
    pyproject = PYPROJECT.format(name=name, publisher="coordinator", clientapp=clientapp).encode()
    content, _ = build_fab_from_files({"pyproject.toml": pyproject, **(files or {"README.md": b"# study\n"})})
    return content


CODE_FREE = _fab()  # what fedrad's deployment bundle is: configuration only, names the installed fedrad


@pytest.fixture()
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A node that runs only its installed fedrad, with CODE_FREE approved; Flower's home is the test's."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.delenv(gate.GATE_APPROVED_ENV, raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    yaml_path = tmp_path / "node.yaml"
    yaml_path.write_text("site: hospital-a\nsuperlink: 127.0.0.1:9092\ninsecure: true\ndata: {path: site.npz}\n"
                         "state_dir: state\napps: {installed_code_only: true}\n")
    allow = AppAllowList.for_state_dir(tmp_path / "state")
    allow.approve(digest=fab_hash(CODE_FREE), by="dpo", info=inspect_fab(CODE_FREE))
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    yield SimpleNamespace(yaml=yaml_path, home=home, allow=allow, marker=tmp_path / "PWNED", tmp=tmp_path,
                          audit=AuditLog(tmp_path / "state" / "audit.jsonl", key_file=tmp_path / "audit.key"))
    sys.path[:] = saved_path  # Flower puts app folders first on sys.path; imported foreign modules go too
    for name in set(sys.modules) - saved_modules:
        if name.startswith("evil_"):
            del sys.modules[name]


def _place_foreign_folder(node: SimpleNamespace, fab: bytes, *, fab_id: str = "coordinator/fedradstudy") -> Path:
    """What the attacker writes: Flower's folder name for the approved app, carrying its own ClientApp."""
    module = f"evil_{uuid.uuid4().hex[:8]}"
    publisher, _, name = fab_id.partition("/")
    folder = flower_app_folder(flwr_home=node.home, fab_id=fab_id, fab_version="1.0.0", digest=fab_hash(fab))
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(name=name, publisher=publisher, clientapp=f"{module}:app"))
    (folder / f"{module}.py").write_text(EVIL.format(marker=str(node.marker)))
    return folder


def _runner(node: SimpleNamespace, fab: bytes, *, fab_id: str = "coordinator/fedradstudy") -> SimpleNamespace:
    """``flwr.supernode.runtime.run_clientapp``'s calls: Flower's real installer and loader; only the
    task input (what the SuperNode would hand over) is made here."""
    context = Context(run_id=7, node_id=1, node_config={NODE_CONFIG_KEY: str(node.yaml)}, state=RecordDict(),
                      run_config={})
    run = SimpleNamespace(fab_id=fab_id, fab_version="1.0.0", fab_hash=fab_hash(fab))
    msg = Message(content=RecordDict({"config": ConfigRecord({"study-id": "s-1", "server-round": 2})}),
                  metadata=Metadata(run_id=7, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=1,
                                    reply_to_message_id="", group_id="2", created_at=time.time(), ttl=3600,
                                    message_type=MessageType.TRAIN))

    def pull_task_input(client: Any) -> tuple[Any, ...]:
        return msg, context, run, Fab(fab_hash(fab), fab, {})

    return SimpleNamespace(__name__="run_clientapp", pull_task_input=pull_task_input, install_from_fab=flower_install,
                           get_load_client_app_fn=flower_loader, install_app_dependencies=lambda *a, **k: None)


def _drive(runner: SimpleNamespace) -> tuple[Any, Message, Context]:
    """The steps of Flower's ``run_clientapp``, in its order, with its arguments."""
    message, context, run, fab = runner.pull_task_input(None)
    runner.install_from_fab(fab.content, skip_prompt=True)
    app = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)
    return app, message, context


def _gated(node: SimpleNamespace, fab: bytes, **kw: Any) -> SimpleNamespace:
    runner = _runner(node, fab, **kw)
    gate.install_gate(runner)
    return runner


def _refused(node: SimpleNamespace, app: Any, message: Message, context: Context) -> str:
    """The reply is fedrad's own refusal, audited under the node's key; returns the audited outcome."""
    assert app is not fedrad_app.app
    reply = app(message=message, context=context)
    assert reply.has_error() and reply.error.code == ERR_POLICY and "app_approval" in reply.error.reason
    assert node.audit.verify() == []
    entry = node.audit.entries()[-1]
    assert entry["kind"] == "train" and entry["outcome"].startswith("refused: rule app_approval")
    return str(entry["outcome"])


def test_without_the_gate_a_preplaced_folder_runs_foreign_code(node: SimpleNamespace) -> None:
    """The attack, against Flower alone: it is real, so the tests below can fail."""
    _place_foreign_folder(node, CODE_FREE)
    app, _, _ = _drive(_runner(node, CODE_FREE))
    assert node.marker.read_text() == "foreign code ran at import"
    assert app is not fedrad_app.app


def test_gate_refuses_a_preplaced_folder_audits_it_and_never_runs_it(node: SimpleNamespace) -> None:
    folder = _place_foreign_folder(node, CODE_FREE)
    runner = _runner(node, CODE_FREE)
    gate.install_gate(runner)

    app, message, context = _drive(runner)

    outcome = _refused(node, app, message, context)
    assert not node.marker.exists()  # the foreign module was never imported
    assert folder.name in outcome and "evil_" in outcome and "not the approved bundle" in outcome
    assert not folder.exists()  # removed, so the next task is clean
    app, _, _ = _drive(_gated(node, CODE_FREE))
    assert app is fedrad_app.app and not node.marker.exists()


def test_folder_placed_after_the_check_is_never_loaded(node: SimpleNamespace) -> None:
    """Flower's folder is not where the gate loads from: placing it after the decision changes nothing."""
    placed: list[Path] = []
    runner = _gated(node, CODE_FREE)
    orig_pull = runner.pull_task_input

    def pull_then_attack(client: Any) -> Any:
        out = orig_pull(client)
        placed.append(_place_foreign_folder(node, CODE_FREE))
        return out

    runner.pull_task_input = pull_then_attack
    app, _, _ = _drive(runner)
    assert app is fedrad_app.app and not node.marker.exists()
    assert placed[0].exists()  # untouched by this task, and unused: the app came from the gate's own copy


def test_run_naming_another_app_folder_is_refused(node: SimpleNamespace) -> None:
    """The run's publisher/name/version choose Flower's folder; they must be the approved bundle's."""
    _place_foreign_folder(node, CODE_FREE, fab_id="mallory/fedradstudy")
    app, message, context = _drive(_gated(node, CODE_FREE, fab_id="mallory/fedradstudy"))
    outcome = _refused(node, app, message, context)
    assert "mallory/fedradstudy" in outcome and not node.marker.exists()


def test_app_folder_changed_between_unpacking_and_import_is_refused(node: SimpleNamespace) -> None:
    runner = _gated(node, CODE_FREE)
    message, context, run, fab = runner.pull_task_input(None)
    installed = Path(runner.install_from_fab(fab.content, skip_prompt=True))
    assert folder_problems(installed, fab_content=CODE_FREE, code_allowed=False) == []
    assert not str(installed).startswith(str(node.home))  # the gate's own folder, not Flower's shared one
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (installed / f"{module}.py").write_text(EVIL.format(marker=str(node.marker)))
    (installed / "pyproject.toml").write_text(PYPROJECT.format(name="fedradstudy", publisher="coordinator",
                                                               clientapp=f"{module}:app"))
    app = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)
    outcome = _refused(node, app, message, context)
    assert "changed after the gate unpacked it" in outcome and not node.marker.exists()


def test_code_carrying_app_folder_must_be_byte_for_byte_the_bundle(node: SimpleNamespace) -> None:
    """On a node that allows code in bundles: a cached .pyc or a changed file beside the approved
    code is foreign; an exact copy (an older fedrad's install) is only removed."""
    node.yaml.write_text(node.yaml.read_text().replace("apps: {installed_code_only: true}\n", ""))
    module = f"evil_{uuid.uuid4().hex[:8]}"
    task = f"LR = 0.1\nfrom pathlib import Path\nPath({str(node.marker)!r}).touch()\n".encode()
    fab = _fab(clientapp=f"{module}:app", files={f"{module}.py": task + b"from flwr.clientapp import ClientApp\n"
                                                 b"app = ClientApp()\n"})
    node.allow.approve(digest=fab_hash(fab), by="dpo", info=inspect_fab(fab))
    exact = Path(flower_install(fab, install_dir=node.home, skip_prompt=True))
    assert folder_problems(exact, fab_content=fab, code_allowed=True) == []
    (exact / "__pycache__").mkdir()
    (exact / "__pycache__" / f"{module}.cpython-311.pyc").write_bytes(b"\x00" * 32)

    app, message, context = _drive(_gated(node, fab))
    assert "compiled code cache" in _refused(node, app, message, context)
    assert not exact.exists() and not node.marker.exists()

    exact = Path(flower_install(fab, install_dir=node.home, skip_prompt=True))  # an exact copy this time
    app, _, _ = _drive(_gated(node, fab))
    assert not exact.exists() and node.marker.exists()  # the approved code ran, from the gate's copy
    assert type(app).__name__ == "ClientApp" and app is not fedrad_app.app


def test_revoking_an_app_removes_its_installed_folder(node: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    other = _fab(name="otherstudy")
    node.allow.approve(digest=fab_hash(other), by="dpo", info=inspect_fab(other))
    revoked = Path(flower_install(CODE_FREE, install_dir=node.home, skip_prompt=True))  # as an older node left it
    kept = Path(flower_install(other, install_dir=node.home, skip_prompt=True))

    assert node_main(["apps", "revoke", "--config", str(node.yaml), fab_hash(CODE_FREE)[:12], "--by", "dpo"]) == 0

    assert not revoked.exists() and kept.exists()
    assert str(revoked) in capsys.readouterr().out


def test_gate_removes_revoked_apps_folders_at_decision_time(node: SimpleNamespace) -> None:
    other = _fab(name="otherstudy")
    node.allow.approve(digest=fab_hash(other), by="dpo", info=inspect_fab(other))
    revoked = Path(flower_install(CODE_FREE, install_dir=node.home, skip_prompt=True))
    node.allow.revoke(digest=fab_hash(CODE_FREE), by="dpo", reason="superseded")  # file edited, not via the CLI

    app, _, _ = _drive(_gated(node, other, fab_id="coordinator/otherstudy"))

    assert app is fedrad_app.app
    assert not revoked.exists() and list((node.home / APP_DIR).iterdir()) == []
    app, message, context = _drive(_gated(node, CODE_FREE))  # and the revoked app itself is refused
    assert "not approved" in _refused(node, app, message, context)
