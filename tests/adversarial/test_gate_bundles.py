"""Security review findings 6, 7, 8 and 10 and stale private copies: what a malformed or crafted bundle
(FAB), or a crafted request, can do to the node's app-approval gate.

6: a zip may name one file twice (``pyproject.toml`` then ``./pyproject.toml``); the reviewer read the
   first, Flower's unpacking keeps the last. 7: malformed bundles crashed the decision (so the refusal
   was not audited) and a small bundle could unpack to hundreds of MiB. 8: ``server-round = inf``
   stopped the refusal from being audited. 10: publisher/name/version from the bundle named the
   folder that is removed. Each test drives the real gate (Flower's real installer and loader).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict

import fedrad.client.runtime.app as fedrad_app
from adversarial.test_gate_app_folder import (  # noqa: F401 - ``node`` is a fixture
    CODE_FREE,
    EVIL,
    PYPROJECT,
    _drive,
    _fab,
    _gated,
    _refused,
    _runner,
    node,
)
from fedrad.client.governance import app_folder, approval
from fedrad.client.governance.app_folder import bundle_files, sweep_stale_private
from fedrad.client.governance.approval import AppNotApproved, fab_hash, inspect_fab
from fedrad.client.runtime import gate

GOOD_TOML = PYPROJECT.format(name="fedradstudy", publisher="coordinator", clientapp="fedrad.client.runtime.secagg_app:app")


def _zip(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            with pytest.warns(UserWarning) if isinstance(name, str) and any(
                    n == name for n in zf.namelist()) else _nothing():
                zf.writestr(name, data)
    return buf.getvalue()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _approve_raw(node: SimpleNamespace, content: bytes) -> None:
    """Put a hash on the allow-list without inspecting the bundle (as an older fedrad could have)."""
    node.allow.approve(digest=fab_hash(content), by="dpo", info=None)


def _message(config: dict[str, Any] | None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)}) if config is not None else RecordDict()
    return Message(content=content, metadata=Metadata(
        run_id=7, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
        group_id="2", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN))


# ---------------------------------------------------------------------------- finding 6: duplicate names
def test_duplicate_pyproject_after_normalisation_is_refused_and_never_runs(node: SimpleNamespace) -> None:
    evil_module = f"evil_{uuid.uuid4().hex[:8]}"
    evil_toml = PYPROJECT.format(name="fedradstudy", publisher="coordinator", clientapp=f"{evil_module}:app")
    fab = _zip([("pyproject.toml", GOOD_TOML.encode()), ("./pyproject.toml", evil_toml.encode())])
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:  # the trick is real: unpacking keeps the last one
        out = node.tmp / "unpacked"
        zf.extractall(out)
    assert evil_module in (out / "pyproject.toml").read_text()

    with pytest.raises(AppNotApproved, match="unsafe member name"):
        inspect_fab(fab)  # `fedrad-node apps approve` cannot approve it
    with pytest.raises(AppNotApproved, match="unsafe member name"):
        bundle_files(fab)
    _approve_raw(node, fab)  # on the allow-list anyway: still refused, and audited
    app, message, context = _drive(_gated(node, fab))
    assert "unsafe member name" in _refused(node, app, message, context)
    assert not node.marker.exists()


def test_same_name_twice_is_refused() -> None:
    evil_toml = PYPROJECT.format(name="fedradstudy", publisher="coordinator", clientapp="other:app")
    fab = _zip([("pyproject.toml", GOOD_TOML.encode()), ("pyproject.toml", evil_toml.encode())])
    with pytest.raises(AppNotApproved, match="more than once"):
        inspect_fab(fab)
    with pytest.raises(AppNotApproved, match="more than once"):
        bundle_files(fab)


@pytest.mark.parametrize("name", ["/etc/x.py", "a/../b.py", "a//b.py", "a\\b.py", "./a.py", "a/./b.py", "..",
                                  "C:/x.py"])
def test_unsafe_member_names_are_refused(name: str) -> None:
    fab = _zip([("pyproject.toml", GOOD_TOML.encode()), (name, b"x = 1\n")])
    with pytest.raises(AppNotApproved, match="unsafe member name"):
        inspect_fab(fab)


def test_clientapp_named_by_the_unpacked_folder_is_checked_again_before_loading(
        node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: even if the file-by-file check missed a change, the ClientApp reference
    Flower will import is read from the unpacked folder and must be the approved bundle's."""
    runner = _runner(node, CODE_FREE)
    gate.install_gate(runner)
    message, context, run, fab = runner.pull_task_input(None)
    installed = Path(runner.install_from_fab(fab.content, skip_prompt=True))
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (installed / f"{module}.py").write_text(EVIL.format(marker=str(node.marker)))
    (installed / "pyproject.toml").write_text(PYPROJECT.format(name="fedradstudy", publisher="coordinator",
                                                               clientapp=f"{module}:app"))
    monkeypatch.setattr(gate, "folder_problems", lambda *a, **k: [])  # the file check is blind here

    app = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)

    assert f"{module}:app" in _refused(node, app, message, context)
    assert not node.marker.exists()


# ---------------------------------------------------------------------------- finding 7: malformed bundles
def _encrypted() -> bytes:
    raw = bytearray(_zip([("pyproject.toml", GOOD_TOML.encode())]))
    # set the "encrypted" flag bit in the local and the central header
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.index(sig)
        raw[i + off] |= 0x1
    return bytes(raw)


def _unsupported_compression() -> bytes:
    raw = bytearray(_zip([("pyproject.toml", GOOD_TOML.encode())]))
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = raw.index(sig)
        raw[i + off:i + off + 2] = (99).to_bytes(2, "little")
    return bytes(raw)


MALFORMED = {
    "nested-toml": lambda: _zip([("pyproject.toml", b"a = " + b"[" * 50_000 + b"]" * 50_000 + b"\n")]),
    "encrypted": _encrypted,
    "unsupported-compression": _unsupported_compression,
    "bomb": lambda: _zip([("pyproject.toml", GOOD_TOML.encode()),
                          ("data.bin", b"\0" * (approval.MAX_MEMBER_BYTES + 1))]),
    "not-a-zip": lambda: b"PK\x03\x04 not really",
    "toml-not-utf8": lambda: _zip([("pyproject.toml", b"\xff\xfe[project]\n")]),
    "many-members": lambda: _zip([("pyproject.toml", GOOD_TOML.encode())]
                                 + [(f"f{i}.txt", b"") for i in range(approval.MAX_MEMBERS)]),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_bundles_are_refusals_never_crashes(kind: str, node: SimpleNamespace) -> None:
    fab = MALFORMED[kind]()
    t0 = time.monotonic()
    with pytest.raises(AppNotApproved, match="not a readable Flower app bundle"):
        inspect_fab(fab)
    if kind not in ("nested-toml", "toml-not-utf8"):  # zip-level damage: the file listing refuses it too
        with pytest.raises(AppNotApproved):
            bundle_files(fab)
    assert time.monotonic() - t0 < 30

    app, message, context = _drive(_gated(node, fab))  # not approved: refused and audited
    assert "not approved" in _refused(node, app, message, context)
    _approve_raw(node, fab)  # approved by hash anyway: still a refusal, audited, never a crash
    app, message, context = _drive(_gated(node, fab))
    assert "not a readable Flower app bundle" in _refused(node, app, message, context)


def test_unapproved_bundle_is_never_opened(node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allow-list lookup comes first: an unapproved bundle is refused without being unzipped."""
    opened: list[bytes] = []
    real = approval.inspect_fab
    monkeypatch.setattr(approval, "inspect_fab", lambda content: opened.append(content) or real(content))
    monkeypatch.setattr(gate, "inspect_fab", approval.inspect_fab)
    fab = MALFORMED["bomb"]()

    app, message, context = _drive(_gated(node, fab))

    assert "not approved" in _refused(node, app, message, context) and opened == []


def test_decide_never_raises(node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kwargs: Any) -> Path:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(gate, "flower_app_folder", broken)
    app, message, context = _drive(_gated(node, CODE_FREE))
    assert "unexpected error while checking the app (RuntimeError" in _refused(node, app, message, context)
    d = gate.decide(fab_content=None, claimed_hash="x", run_fab_hash=None, node_config={})  # type: ignore[arg-type]
    assert not d.approved


# ---------------------------------------------------------------------------- finding 8: ids never block the audit
@pytest.mark.parametrize("config", [
    {"study-id": "s-1", "server-round": float("inf")},
    {"study-id": "s-1", "server-round": float("nan")},
    {"study-id": "s-1", "server-round": 2, "round-offset": [1, 2]},
    {"study-id": "s-1", "server-round": 10**30},
    None,
])
def test_refusal_is_audited_whatever_the_request_ids(config: dict[str, Any] | None, node: SimpleNamespace) -> None:
    unapproved = _fab(name="otherstudy")
    app, _, context = _drive(_gated(node, unapproved, fab_id="coordinator/otherstudy"))
    message = _message(config)

    _refused(node, app, message, context)

    entry = node.audit.entries()[-1]
    assert entry["round"] == 0 and entry["study"] == ("?" if config is None else "s-1")


def test_coordinator_strings_are_recorded_as_one_line_of_json(node: SimpleNamespace) -> None:
    study = "$(id>/tmp/x)\n`touch /tmp/y`\x1b[2J" + "é" * 5000
    unapproved = _fab(name="otherstudy")
    app, _, context = _drive(_gated(node, unapproved, fab_id="coordinator/otherstudy"))

    _refused(node, app, _message({"study-id": study, "server-round": 1}), context)

    raw = (node.tmp / "state" / "audit.jsonl").read_bytes()
    assert raw.isascii() and raw.count(b"\n") == len(node.audit.entries()) and b"\x1b" not in raw
    assert node.audit.entries()[-1]["study"] == study[:64]


# ---------------------------------------------------------------------------- finding 10: metadata names folders
@pytest.mark.parametrize("field,value", [("version", "1/../../../victim"), ("version", "1.0"),
                                         ("name", "../victim"), ("publisher", ".."), ("publisher", "a/b")])
def test_bundle_metadata_that_could_name_another_folder_is_refused(
        field: str, value: str, node: SimpleNamespace) -> None:
    victim = node.tmp / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    toml = {"name": "fedradstudy", "publisher": "coordinator", "clientapp": "fedrad.client.runtime.app:app"}
    text = PYPROJECT.format(**{**toml, **({field: value} if field != "version" else {})})
    if field == "version":
        text = text.replace('version = "1.0.0"', f'version = "{value}"')
    fab = _zip([("pyproject.toml", text.encode()), ("README.md", b"# x\n")])

    with pytest.raises(AppNotApproved, match=f"{field} = "):
        inspect_fab(fab)
    _approve_raw(node, fab)
    app, message, context = _drive(_gated(node, fab))
    _refused(node, app, message, context)
    assert (victim / "keep.txt").read_text() == "precious"


def test_flower_folder_outside_the_apps_folder_is_never_removed(node: SimpleNamespace) -> None:
    victim = node.tmp / "victim.12345678"
    victim.mkdir()
    d = gate.GateDecision(fab_hash(CODE_FREE), True, audit_path=node.tmp / "state" / "audit.jsonl")
    out = gate._check_flower_folder(d, fab_content=CODE_FREE, flwr_home=node.home,
                                    folder=node.home / "apps" / ".." / ".." / victim.name)
    assert not out.approved and "outside Flower's apps folder" in out.reason and victim.exists()


# ---------------------------------------------------------------------------- stale private copies
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_stale_private_copies_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    now = time.time()

    def copy(name: str, *, owner: int | None, age_s: float) -> Path:
        p = tmp_path / f"{app_folder.PRIVATE_PREFIX}{name}"
        (p / "apps" / "x").mkdir(parents=True)
        if owner is not None:
            (p / "owner.pid").write_text(str(owner))
        os.utime(p, (now - age_s, now - age_s))
        return p

    dead = copy("dead", owner=_dead_pid(), age_s=1)
    live = copy("live", owner=os.getpid(), age_s=10 * app_folder.STALE_AFTER_S)
    old_unknown = copy("oldunknown", owner=None, age_s=app_folder.STALE_AFTER_S + 60)
    fresh_unknown = copy("freshunknown", owner=None, age_s=5)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    link = tmp_path / f"{app_folder.PRIVATE_PREFIX}link"
    link.symlink_to(victim)
    other = tmp_path / "not-ours-by-name"
    other.mkdir()

    removed = sweep_stale_private(tmp_dir=tmp_path, now=now)

    assert sorted(removed) == sorted([dead, old_unknown])
    assert not dead.exists() and not old_unknown.exists()
    assert live.exists() and fresh_unknown.exists() and link.is_symlink() and other.exists()
    assert (victim / "keep.txt").read_text() == "precious"


def test_private_copies_record_their_owner(node: SimpleNamespace) -> None:
    runner = _runner(node, CODE_FREE)
    gate.install_gate(runner)
    _, _, _, fab = runner.pull_task_input(None)
    installed = Path(runner.install_from_fab(fab.content, skip_prompt=True))
    home = next(p for p in installed.parents if p.name.startswith(app_folder.PRIVATE_PREFIX))
    assert (home / "owner.pid").read_text() == str(os.getpid())
    swept = sweep_stale_private(tmp_dir=home.parent)  # the real temp folder: others' dead copies may go
    assert home not in swept and installed.exists()  # its owner runs: kept
    app = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        "coordinator/fedradstudy", "1.0.0", fab.hash_str)
    assert app is fedrad_app.app


def test_gate_start_sweeps_stale_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{app_folder.PRIVATE_PREFIX}killed"
    (stale / "apps").mkdir(parents=True)
    (stale / "owner.pid").write_text(str(_dead_pid()))

    def stop(module: Any) -> None:  # the gate's own start is not under test: stop right after the sweep
        raise AppNotApproved("stop here")

    monkeypatch.setattr(gate, "install_gate", stop)

    assert gate.main([]) == AppNotApproved.exit_code
    assert not stale.exists()


def test_flower_unpacking_the_approved_bundle_is_left_alone_not_refused(node: SimpleNamespace) -> None:
    # arrange: Flower's folder holds some of the approved bundle's files, byte for byte, the rest
    # not written yet (Flower unpacking it while a task's gate looks: seen in SecAgg+ e2e runs)
    files = bundle_files(CODE_FREE)
    folder = node.home / "apps" / "coordinator.fedradstudy.1.0.0.12345678"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(CODE_FREE)) as zf:
        written = sorted(files)[:-1]  # one file missing
        for rel in written:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(zf.read(rel))
    d = gate.GateDecision(fab_hash(CODE_FREE), True, audit_path=node.tmp / "state" / "audit.jsonl")

    # act
    out = gate._check_flower_folder(d, fab_content=CODE_FREE, flwr_home=node.home, folder=folder)

    # assert: approved, and the folder left to Flower (never loaded by the gate)
    assert out.approved and folder.is_dir()


def test_a_partial_folder_with_one_foreign_byte_is_still_refused(node: SimpleNamespace) -> None:
    files = bundle_files(CODE_FREE)
    folder = node.home / "apps" / "coordinator.fedradstudy.1.0.0.12345678"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(CODE_FREE)) as zf:
        first, *rest = sorted(files)
        (folder / first).parent.mkdir(parents=True, exist_ok=True)
        (folder / first).write_bytes(zf.read(first) + b"#")  # changed, and the rest missing
    d = gate.GateDecision(fab_hash(CODE_FREE), True, audit_path=node.tmp / "state" / "audit.jsonl")

    out = gate._check_flower_folder(d, fab_content=CODE_FREE, flwr_home=node.home, folder=folder)

    assert not out.approved and "not the approved bundle" in out.reason and not folder.exists()
