"""The node's gate in front of Flower's ``flwr-clientapp``: unapproved apps never run.

How Flower 1.41 runs an app on a SuperNode (``isolation=subprocess``, the default): the
SuperNode pulls the message, the Run and the FAB from the SuperLink and starts
``flower-superexec``; for each message SuperExec starts the command ``flwr-clientapp`` (looked up
on ``PATH``), which pulls message, Context, Run and FAB from the SuperNode
(``run_clientapp.pull_task_input``), unpacks the FAB (``install_from_fab``), puts the unpacked
folder first on ``sys.path`` and imports the ClientApp it names (``get_load_client_app_fn``).
Flower's own check at this point (``--trusted-entities``) needs FABs signed by its hub.

``fedrad-node start`` puts a ``flwr-clientapp`` and a ``flower-superexec`` of its own first on
``PATH`` (:func:`write_shim`, :func:`gated_env`) and runs the SuperNode with its own interpreter.
Its ``flower-superexec`` is Flower's, except that it starts the gate by absolute path: a wrapper
that puts another folder first on ``PATH`` (pyenv's shims do) cannot make SuperExec find Flower's
ungated ``flwr-clientapp`` instead (:func:`superexec_main`).

The gate runs Flower's ClientApp process unchanged except at those three calls (:func:`install_gate`):

* right after the FAB arrives its hash is checked against the node's allow-list
  (:func:`fedrad.client.governance.approval.verify_app`), and the run must name the app the bundle is (a run
  naming another publisher, name or version would make Flower load another folder); an app that
  is not approved is neither unpacked nor imported, and the reply is an error (``ERR_POLICY``, rule
  ``app_approval``) sent by fedrad's own code, recorded in the node's audit log;
* the node runs exactly the code it approved (:mod:`fedrad.client.governance.app_folder`): Flower would load
  the app from ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<8 hex>`` and skip unpacking when
  that folder exists, so the gate never uses it. It unpacks the approved bundle's verified bytes
  into a private folder of its own, checks it file by file (full sha256) after unpacking and
  again right before the import, and loads the app from there. Flower's folder for the app, if
  present, is removed; if it was not byte for byte the approved bundle (pre-placed code) the task
  is refused and audited. Folders of revoked apps are removed at every decision;
* runtime dependency installation is always off.

Only ClientApp tasks run on a node. The coordinator's Run chooses the task type Flower starts
(``primary_task_type``: an AgentApp run makes the SuperNode create ``flwr-agentapp`` tasks, which
unpack the bundle and import its code without passing the gate), so the node's SuperExec asks for
ClientApp tasks only and points every other task type at :data:`REFUSE_COMMAND`, which exits
non-zero (:func:`restrict_superexec`), and the SuperNode process creates no task of another type
(:func:`restrict_supernode`, from :func:`regate_path`).

The decision never raises: a malformed bundle, a damaged file, a request whose ids are nonsense
(``server-round = inf``) are refusals like any other, recorded in the audit log. Private copies
left behind by a task that was killed (``SIGKILL`` skips its exit handlers) are removed when the
next task starts (:func:`fedrad.client.governance.app_folder.sweep_stale_private`).

If the Flower internals the gate wraps are missing (another Flower version), the gate refuses to
start: it fails closed. The node's warm runtime (:mod:`fedrad.client.runtime.warm`) forks tasks that run
this same :func:`main`, so they pass the same gate.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedrad.client.governance.app_folder import (
    APP_DIR,
    flower_app_folder,
    flower_home,
    folder_problems,
    install_private,
    remove_app_folders,
    remove_folder,
    summarize,
    sweep_stale_private,
)
from fedrad.client.governance.approval import (
    INSTALLED_CLIENTAPPS,
    AppAllowList,
    AppApprovalSettings,
    AppNotApproved,
    fab_hash,
    inspect_fab,
    unpacked_clientapp,
    verify_app,
)
from fedrad.common.durable import atomic_write_text
from fedrad.common.errors import FedradError
from fedrad.common.protocol import CONFIG_KEY, ERR_POLICY

log = logging.getLogger(__name__)

#: The command SuperExec starts for every ClientApp task (``flwr.supercore.constant``).
CLIENTAPP_COMMAND = "flwr-clientapp"
#: The command the SuperNode starts its SuperExec with (``flwr.supernode.start_client_internal``).
SUPEREXEC_COMMAND = "flower-superexec"
#: Fallback for the node.yaml path when the SuperNode's node config lacks it (set by fedrad-node start).
NODE_CONFIG_ENV = "FEDRAD_NODE_CONFIG"
#: The folder holding the node's gate and SuperExec (set by :func:`gated_env`; read by the SuperNode process).
GATE_BIN_ENV = "FEDRAD_GATE_BIN"
#: Set in the ClientApp process once the gate approved its app (read by :func:`require_gate`).
GATE_APPROVED_ENV = "FEDRAD_APPROVED_APP"
#: The Flower calls the gate wraps, in ``flwr.supernode.runtime.run_clientapp``.
GATED_CALLS = ("pull_task_input", "install_from_fab", "get_load_client_app_fn")
_DEP_INSTALL_FLAG = "--allow-runtime-dependency-installation"
_EXECUTABLE = 0o750  # the node's own user runs the shims; group may read and run them
#: Wall-clock time (``time.time()``) at which this task's process started (set by the shim; for the timing log).
TASK_T0_ENV = "FEDRAD_TASK_T0"
#: The command the node's SuperExec starts for every task type other than a ClientApp's: it refuses
#: and exits non-zero (an AgentApp, ServerApp, simulation, model or connector task never runs on a node).
REFUSE_COMMAND = "fedrad-refuse-task"
#: Exit status of :data:`REFUSE_COMMAND`.
REFUSED_EXIT = 126


def task_age() -> float | None:
    """Seconds since this ClientApp task's process started (None outside the gate)."""
    t0 = os.environ.get(TASK_T0_ENV)
    try:
        return time.time() - float(t0) if t0 else None
    except ValueError:
        return None


@dataclass(frozen=True)
class GateDecision:
    """Whether this task's app may run, and where to record a refusal."""

    fab_hash: str
    approved: bool
    reason: str = ""
    audit_path: Path | None = None
    policy_version: str = ""
    #: The node's audit key (None: unkeyed log, e.g. no node configuration could be read).
    audit_key: Path | None = None
    #: Whether the app's folder may hold code (False on an ``apps.installed_code_only`` node).
    code_allowed: bool = True
    #: The ClientApp reference the approved bundle names (checked again in the unpacked folder before loading).
    clientapp: str = ""

    def refuse(self, reason: str | AppNotApproved) -> "GateDecision":
        """This decision, turned into a refusal for ``reason`` (worded as :class:`AppNotApproved` words it)."""
        return replace(self, approved=False, reason=str(reason if isinstance(reason, AppNotApproved)
                                                         else AppNotApproved(reason)))


def decide(
    *,
    fab_content: bytes,
    claimed_hash: str,
    run_fab_hash: str | None,
    node_config: Mapping[str, Any],
    run_fab_id: str | None = None,
    run_fab_version: str | None = None,
    flwr_home: Path | None = None,
) -> GateDecision:
    """Decide whether the FAB may run on this node; never raises (any doubt is a refusal).

    Besides the allow-list: the run must name the bundle's own publisher/name and version, and
    Flower's folder for the app (``flwr_home``, default Flower's) must be absent or exactly the
    bundle; it is removed either way, as are the folders of revoked apps. Any unexpected error
    (a malformed bundle, a damaged file) is a refusal, audited like any other once the node's
    audit log is known.
    """
    try:
        digest = fab_hash(fab_content)
    except Exception as exc:  # noqa: BLE001 - not bytes at all: refuse
        return GateDecision("?", False, str(AppNotApproved(f"bundle unreadable ({type(exc).__name__})")))
    try:
        base, settings = _node_decision(digest, node_config)
    except Exception as exc:  # noqa: BLE001 - the decision never raises
        log.exception("app %s: could not read the node configuration", digest[:16])
        return GateDecision(digest, False, str(AppNotApproved(
            f"node configuration unreadable, refusing every app ({type(exc).__name__}: {exc})")))
    if not base.approved:
        return base
    try:
        return _decide_app(base, settings, fab_content=fab_content, claimed_hash=claimed_hash,
                           run_fab_hash=run_fab_hash, run_fab_id=run_fab_id, run_fab_version=run_fab_version,
                           flwr_home=flwr_home)
    except AppNotApproved as exc:
        return base.refuse(exc)
    except Exception as exc:  # noqa: BLE001 - any doubt is an (audited) refusal
        log.exception("app %s: unexpected error while deciding", digest[:16])
        return base.refuse(f"unexpected error while checking the app ({type(exc).__name__}: {str(exc)[:200]})")


def _node_decision(digest: str, node_config: Mapping[str, Any]) -> tuple[GateDecision, AppApprovalSettings]:
    """The decision's node-side part (audit log, key, policy version); a refusal if the node's
    configuration is missing or unreadable."""
    from fedrad.client.governance.audit_key import node_audit_key
    from fedrad.client.runtime.node_config import NODE_CONFIG_KEY, load_node_config

    strict = AppApprovalSettings()
    path = node_config.get(NODE_CONFIG_KEY) or os.environ.get(NODE_CONFIG_ENV)
    if not path:
        return GateDecision(digest, False, f"no node configuration ({NODE_CONFIG_KEY}): refusing every app"), strict
    try:
        node = load_node_config(str(path))
        audit_key = node_audit_key(node=node, node_yaml=Path(str(path)))
    except FedradError as exc:
        return GateDecision(digest, False, f"node configuration unreadable, refusing every app: {exc}"), strict
    return (GateDecision(digest, True, "", node.state_dir / "audit.jsonl", node.policy.version(), audit_key,
                         not node.apps.installed_code_only), node.apps)


def _decide_app(base: GateDecision, settings: AppApprovalSettings, *, fab_content: bytes, claimed_hash: str,
                run_fab_hash: str | None, run_fab_id: str | None, run_fab_version: str | None,
                flwr_home: Path | None) -> GateDecision:
    digest = base.fab_hash
    assert base.audit_path is not None
    state_dir = base.audit_path.parent
    allow = AppAllowList.for_state_dir(state_dir)
    if run_fab_hash is not None and run_fab_hash != claimed_hash:
        raise AppNotApproved(f"run names app sha256 {run_fab_hash} but the bundle received is {claimed_hash}")
    verify_app(fab_content=fab_content, claimed_hash=claimed_hash, allow_list=allow, settings=settings)
    info = inspect_fab(fab_content)  # only ever reached for an approved bundle
    if run_fab_id is not None and (run_fab_id, run_fab_version) != (f"{info.publisher}/{info.name}", info.version):
        raise AppNotApproved(f"run names app {run_fab_id!r} version {run_fab_version!r} but the bundle "
                             f"(sha256 {digest}) is {info.publisher}/{info.name!s} version {info.version!r}")
    if not info.clientapp:
        raise AppNotApproved(f"app {info.label} (sha256 {digest}) names no ClientApp")
    d = replace(base, clientapp=info.clientapp)
    home = flower_home() if flwr_home is None else flwr_home
    _sweep_revoked(allow, home)
    return _check_flower_folder(d, fab_content=fab_content, flwr_home=home, folder=flower_app_folder(
        flwr_home=home, fab_id=f"{info.publisher}/{info.name}", fab_version=info.version, digest=digest))


def _sweep_revoked(allow: AppAllowList, flwr_home: Path) -> None:
    try:
        records = allow.records()
        remove_app_folders(flwr_home=flwr_home, revoked=[str(r["fab_hash"]) for r in records if r.get("revoked_at")],
                           approved=[str(r["fab_hash"]) for r in records if not r.get("revoked_at")])
    except (OSError, FedradError, KeyError) as exc:  # never in the way of the decision itself
        log.error("could not remove the installed folders of revoked apps: %s", exc)


def _check_flower_folder(d: GateDecision, *, fab_content: bytes, flwr_home: Path, folder: Path) -> GateDecision:
    """Flower's own folder for this app is never loaded; remove it, refusing if it was not the bundle.

    The folder's name comes from the bundle's metadata (validated by :func:`inspect_fab`); it must
    still be a direct child of ``$FLWR_HOME/apps`` or nothing is removed and the app is refused.
    """
    if folder.parent != flwr_home / APP_DIR or folder.name in ("", ".", "..") or "/" in folder.name:
        return d.refuse(f"the bundle's publisher/name/version name a folder outside Flower's apps folder "
                        f"({folder!s}); nothing removed")
    if not (folder.exists() or folder.is_symlink()):
        return d
    try:
        problems = folder_problems(folder, fab_content=fab_content, code_allowed=d.code_allowed)
    except OSError as exc:
        problems = [f"unreadable ({exc})"]
    if problems and all(p.endswith(": missing") for p in problems):
        # Only some of the bundle's own files, each byte for byte: Flower is unpacking the approved
        # bundle there right now (seen in SecAgg+ rounds, whose stages start task after task). Nothing
        # foreign to refuse, and removing it under Flower would break that unpacking: left alone
        # (never loaded); a later task removes it once it is whole.
        log.info("Flower's folder of app %s is being unpacked (%d of the bundle's files still missing); "
                 "left alone, never loaded", d.fab_hash[:16], len(problems))
        return d
    try:
        remove_folder(folder)
    except OSError as exc:
        problems.append(f"could not be removed ({exc.strerror})")
    if not problems:
        log.info("removed Flower's unused install of app %s (the gate installs approved apps privately)", d.fab_hash[:16])
        return d
    log.warning("foreign files in Flower's folder of app %s: refusing", d.fab_hash[:16])
    return d.refuse(f"Flower's app folder {folder.name} held files that are not the approved bundle "
                    f"(removed, never loaded): {summarize(problems)}")


def _audit_refusal(decision: GateDecision, msg: Message, kind: str) -> None:
    from fedrad.client.governance.audit_log import AuditLog

    if decision.audit_path is None:
        return
    study, rnd = "?", 0
    try:  # the request's config record is data, not code: reading its ids is safe
        cfg = msg.content[CONFIG_KEY]
        study = str(cfg.get("study-id", "?"))[:64]
    except Exception:  # noqa: BLE001 - nothing the coordinator sends may prevent the audit
        cfg, study = {}, "?"
    try:
        rnd = int(cfg.get("server-round", 0)) + int(cfg.get("round-offset", 0))  # type: ignore[arg-type]
        if not 0 <= rnd <= 10**9:
            rnd = 0
    except Exception:  # noqa: BLE001 - inf (OverflowError), nan, lists...: recorded as round 0
        rnd = 0
    try:
        AuditLog(decision.audit_path, key_file=decision.audit_key).append(
            study=study, round=rnd, kind=kind, content=None, epsilon_before=None, epsilon_after=None,
            policy_version=decision.policy_version, outcome=f"refused: {decision.reason}")
    except Exception:  # noqa: BLE001 - the refusal reply is sent whatever happens here
        log.exception("could not record the refusal of app %s in the audit log", decision.fab_hash[:16])


def refusal_app(decision: GateDecision) -> ClientApp:
    """fedrad's own ClientApp that answers every message of a refused app with an error."""
    app = ClientApp()
    reason = f"{AppNotApproved.__name__}: {decision.reason}"

    def _refuse(kind: str) -> Callable[[Message, Context], Message]:
        def handler(msg: Message, context: Context) -> Message:
            _audit_refusal(decision, msg, kind)
            return Message(Error(code=ERR_POLICY, reason=reason), reply_to=msg)

        return handler

    app.train()(_refuse("train"))
    app.evaluate()(_refuse("evaluate"))
    app.query()(_refuse("query"))
    return app


def require_gate(*, context: Context) -> None:
    """Defence in depth for fedrad's own ClientApp: in deployment, refuse to work unless this process
    runs behind the node's gate and the gate approved the app (a node started without
    ``fedrad-node start`` would otherwise run unchecked bundles). Simulation has no bundle: no-op.
    """
    if "partition-id" in context.node_config:
        return
    if not os.environ.get(GATE_APPROVED_ENV):
        raise AppNotApproved("this ClientApp runs without the node's app-approval gate (start the node with "
                             "`fedrad-node start`): refusing")


def install_gate(module: Any) -> None:
    """Wrap Flower's ClientApp runner (``module``) so that only approved apps are installed and loaded,
    and only from the gate's own verified copy of the approved bundle.

    Raises :class:`AppNotApproved` (the caller must then not run Flower) when ``module`` lacks
    any call in :data:`GATED_CALLS`.
    """
    missing = [name for name in GATED_CALLS if not callable(getattr(module, name, None))]
    if missing:
        raise AppNotApproved(f"cannot gate this Flower version ({', '.join(missing)} not found in "
                             f"{getattr(module, '__name__', module)}): refusing to run any app")
    if getattr(module, "_fedrad_gate", False):
        return
    orig_pull = module.pull_task_input
    orig_install = module.install_from_fab
    orig_loader = module.get_load_client_app_fn
    has_deps = getattr(module, "install_app_dependencies", None) is not None
    state: dict[str, Any] = {"decision": None, "content": None, "run": None, "installed": None}

    def refused() -> GateDecision | None:
        d = state["decision"]
        return None if d is not None and d.approved else (d or GateDecision("?", False, "app not verified"))

    def refuse(reason: str | AppNotApproved) -> GateDecision:
        d = (state["decision"] or GateDecision("?", False)).refuse(reason)
        state["decision"] = d
        log.warning("app %s refused: %s", d.fab_hash[:16], d.reason)
        return d

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = orig_pull(client)
        d = decide(fab_content=fab.content, claimed_hash=fab.hash_str, run_fab_hash=getattr(run, "fab_hash", None),
                   node_config=context.node_config, run_fab_id=getattr(run, "fab_id", ""),
                   run_fab_version=getattr(run, "fab_version", ""))
        state.update(decision=d, content=fab.content, run=(run.fab_id, run.fab_version, fab.hash_str))
        if d.approved:
            os.environ[GATE_APPROVED_ENV] = d.fab_hash
            age = task_age()
            log.info("app %s approved on this node (task input pulled %.2fs after the task process started)",
                     d.fab_hash[:16], -1.0 if age is None else age)
        else:
            log.warning("app %s refused: %s", d.fab_hash[:16], d.reason)
        return message, context, run, fab

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        d = refused()
        if d is not None:
            return Path(tempfile.gettempdir()) / "fedrad-refused-app"  # nothing unpacked
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        if content != state["content"] or fab_hash(content) != state["decision"].fab_hash:
            raise AppNotApproved("the bundle being installed is not the one that was approved")
        try:  # into the gate's own folder, never Flower's shared one (which may hold anything)
            state["installed"] = install_private(fab_content=content, installer=orig_install,
                                                 code_allowed=state["decision"].code_allowed)
        except AppNotApproved as exc:
            refuse(exc)
            return Path(tempfile.gettempdir()) / "fedrad-refused-app"
        return state["installed"]

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Any:
        d = refused()
        if d is not None:
            return lambda *_a, **_k: refusal_app(d)
        installed: Path | None = state["installed"]
        if installed is None:
            return lambda *_a, **_k: refusal_app(refuse("the approved bundle was not installed by the gate"))
        # The installed fedrad is imported before Flower puts the app's folder first on sys.path,
        # so a bundle cannot shadow fedrad's modules with its own copies.
        importlib.import_module("fedrad.client.runtime.app")
        inner = orig_loader(default_app_ref="", app_path=str(installed), multi_app=True)

        def load(fab_id: str, fab_version: str, fab_hash_str: str) -> Any:
            if (fab_id, fab_version, fab_hash_str) != state["run"]:
                return refusal_app(refuse(f"asked to load {fab_id} {fab_version} ({fab_hash_str[:16]}), not the "
                                          "approved app of this task"))
            problems = folder_problems(installed, fab_content=state["content"],
                                       code_allowed=state["decision"].code_allowed)
            if problems:  # changed between unpacking and import
                return refusal_app(refuse(f"the app folder changed after the gate unpacked it: {summarize(problems)}"))
            named = unpacked_clientapp(installed)  # what Flower will import, read from the verified folder
            decision: GateDecision = state["decision"]
            if named != decision.clientapp or (not decision.code_allowed and named not in INSTALLED_CLIENTAPPS):
                return refusal_app(refuse(f"the unpacked app names ClientApp {named!r}, not the approved bundle's "
                                          f"{decision.clientapp!r}"))
            sys.dont_write_bytecode = True  # no compiled cache is left in (or later read from) the folder
            return inner(fab_id, fab_version, fab_hash_str)

        return load

    def install_app_dependencies(*args: Any, **kwargs: Any) -> Any:
        log.warning("runtime dependency installation is disabled on this node")
        return None

    module.pull_task_input = pull_task_input
    module.install_from_fab = install_from_fab
    module.get_load_client_app_fn = get_load_client_app_fn
    if has_deps:
        module.install_app_dependencies = install_app_dependencies
    module._fedrad_gate = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the node's ``flwr-clientapp``: Flower's, behind the gate."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "alembic"):  # one line per HTTP request / plugin otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if _DEP_INSTALL_FLAG in args:
        args = [a for a in args if a != _DEP_INSTALL_FLAG]
        log.warning("runtime dependency installation is disabled on this node")
    from flwr.supernode.runtime import run_clientapp as runner

    try:
        sweep_stale_private()  # private copies left by tasks that were killed (SIGKILL skips atexit)
    except Exception:  # noqa: BLE001 - housekeeping never stops the gate
        log.exception("could not remove stale private app copies")
    try:
        install_gate(runner)
    except FedradError as exc:
        log.error("%s", exc)
        return exc.exit_code
    # the module itself (the package re-exports a function of the same name)
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    sys.argv = [sys.argv[0], *args]
    cli.flwr_clientapp()  # exits the process (flwr_exit)
    return 0  # pragma: no cover


def restrict_superexec(*, gate_path: Path, refuse_path: Path) -> None:
    """Make this process's SuperExec start ClientApp tasks only, and only through the gate.

    Flower's SuperExec (``AutoExecPlugin``) accepts every task type and starts the command
    ``TASK_TYPE_TO_COMMAND`` names for it, looked up on ``PATH``; the task type comes from the
    coordinator's Run (an AgentApp run makes the SuperNode create ``flwr-agentapp`` tasks, which
    unpack the bundle and import its code, ungated). So: the plugin asks for ClientApp tasks only,
    every other task type is pointed at :data:`REFUSE_COMMAND` (exits non-zero, runs nothing), and the
    ClientApp's at the gate, all by absolute path. Raises ImportError/AttributeError if this Flower
    lacks those internals (the caller then refuses to start).
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin import base_exec_plugin

    for task_type in set(TaskType) | set(TASK_TYPE_TO_COMMAND):
        TASK_TYPE_TO_COMMAND[task_type] = str(refuse_path)  # the executors read this dict per launch
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(gate_path)
    plugin_cls = base_exec_plugin.AutoExecPlugin
    plugin_cls.supported_task_types = frozenset({TaskType.CLIENT_APP})  # type: ignore[misc]
    plugin_cls.visible_output_task_types = frozenset({TaskType.CLIENT_APP})  # type: ignore[misc]


def restrict_supernode() -> None:
    """In the SuperNode's own process: refuse to create any task but a ClientApp's.

    Flower 1.41's SuperNode creates an AgentApp task when the coordinator's Run says
    ``primary_task_type`` is an AgentApp (``start_client_internal``), and a running task may ask
    the SuperNode to create more; every task is created through the node state's ``create_task``,
    which here answers None (Flower then drops the message: "Failed to create task") for any other
    type. Raises ImportError/AttributeError if this Flower lacks that call.
    """
    from flwr.supercore.constant import TaskType
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    create = InMemoryNodeState.create_task
    if getattr(create, "_fedrad_gate", False):
        return

    def create_task(self: Any, task_type: str, *args: Any, **kwargs: Any) -> int | None:
        if task_type != TaskType.CLIENT_APP:
            log.error("refused a %r task: this node runs ClientApp tasks only, behind its app-approval gate",
                      str(task_type)[:64])
            return None
        return create(self, task_type, *args, **kwargs)

    create_task._fedrad_gate = True  # type: ignore[attr-defined]
    InMemoryNodeState.create_task = create_task  # type: ignore[method-assign]


def refuse_task_main(argv: Sequence[str] | None = None) -> int:
    """The node's :data:`REFUSE_COMMAND`: what SuperExec starts for any task that is not a ClientApp's.
    Imports nothing of the task, contacts nothing, exits :data:`REFUSED_EXIT`."""
    del argv
    sys.stderr.write("fedrad: this node runs ClientApp tasks only, behind its app-approval gate; task refused\n")
    return REFUSED_EXIT


def superexec_main(bin_dir: str | Path) -> int:
    """The node's ``flower-superexec``: Flower's SuperExec, starting ClientApp tasks only, and only
    through the gate in ``bin_dir`` (by absolute path); every other task type is refused
    (:func:`restrict_superexec`). Fails closed if this Flower has no such mapping."""
    gate_path = Path(bin_dir).resolve() / CLIENTAPP_COMMAND
    refuse_path = Path(bin_dir).resolve() / REFUSE_COMMAND
    for needed in (gate_path, refuse_path):
        if not os.access(needed, os.X_OK):
            log.error("the node's %s is missing: refusing to start SuperExec", needed)
            return 1
    try:
        restrict_superexec(gate_path=gate_path, refuse_path=refuse_path)
        from flwr.supercore.cli import flower_superexec
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        log.error("cannot gate this Flower version's SuperExec (%s): refusing to start", exc)
        return 1
    os.environ["PATH"] = os.pathsep.join([str(gate_path.parent), os.environ.get("PATH", "")])
    sys.argv[0] = SUPEREXEC_COMMAND
    flower_superexec()
    return 0


# ---------------------------------------------------------------------------- launcher side
def write_shim(bin_dir: str | Path, *, python: str | None = None) -> Path:
    """Write the node's ``flwr-clientapp`` (runs :func:`main` with this interpreter), its
    ``flower-superexec`` (:func:`superexec_main`) and its :data:`REFUSE_COMMAND`
    (:func:`refuse_task_main`) into ``bin_dir``; returns the ``flwr-clientapp``."""
    d = Path(bin_dir)
    interpreter = python or sys.executable
    target = d / CLIENTAPP_COMMAND
    atomic_write_text(target, (
        f"#!{interpreter}\n"
        "# fedrad: Flower's flwr-clientapp behind the node's app-approval gate (written by fedrad-node start);\n"
        "# run by the node's warm runtime when it is up (fedrad.client.runtime.warm), else cold\n"
        "import os\nimport sys\nimport time\n\n"
        f"os.environ[{TASK_T0_ENV!r}] = repr(time.time())\n\n"
        "from fedrad.client.runtime.warm import run_task\n\nsys.exit(run_task(sys.argv[1:]))\n"), mode=_EXECUTABLE)
    atomic_write_text(d / SUPEREXEC_COMMAND, (
        f"#!{interpreter}\n"
        "# fedrad: Flower's flower-superexec, starting ClientApps only through this folder's gate\n"
        "# (written by fedrad-node start)\n"
        "import sys\n\nfrom fedrad.client.runtime.gate import superexec_main\n\n"
        f"sys.exit(superexec_main({str(d.resolve())!r}))\n"), mode=_EXECUTABLE)
    atomic_write_text(d / REFUSE_COMMAND, (
        f"#!{interpreter}\n"
        "# fedrad: what the node's SuperExec starts for any task that is not a ClientApp's: refuses it\n"
        "# (written by fedrad-node start)\n"
        "import sys\n\nfrom fedrad.client.runtime.gate import refuse_task_main\n\n"
        "sys.exit(refuse_task_main(sys.argv[1:]))\n"), mode=_EXECUTABLE)
    return target


def gated_env(*, bin_dir: str | Path, node_config: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``flower-supernode`` / ``flower-superexec``: the gate first on PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(bin_dir).resolve()), env.get("PATH", "")])
    env[GATE_BIN_ENV] = str(Path(bin_dir).resolve())
    env[NODE_CONFIG_ENV] = str(Path(node_config).resolve())
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def regate_path() -> None:
    """In the SuperNode's own process: put the gate's folder first on ``PATH`` again (a wrapper
    such as pyenv's shims may have put another first since :func:`gated_env`), then check it, and
    refuse every task type but a ClientApp's (:func:`restrict_supernode`).
    Raises :class:`FedradError` when the process was not started with a gated environment."""
    bin_dir = os.environ.get(GATE_BIN_ENV)
    if not bin_dir:
        raise FedradError(f"{GATE_BIN_ENV} is not set: start the node with `fedrad-node start`")
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    check_gated(os.environ, bin_dir=bin_dir)
    try:
        restrict_supernode()
    except (ImportError, AttributeError) as exc:
        raise FedradError(f"cannot restrict this Flower version's SuperNode to ClientApp tasks ({exc}); "
                          "refusing to start") from None


def check_gated(env: Mapping[str, str], *, bin_dir: str | Path) -> None:
    """Raise :class:`FedradError` unless ``flwr-clientapp`` and ``flower-superexec`` resolve to the
    node's own under ``env``."""
    for command in (CLIENTAPP_COMMAND, SUPEREXEC_COMMAND):
        found = shutil.which(command, path=env.get("PATH"))
        want = Path(bin_dir).resolve() / command
        if found is None or Path(found).resolve() != want:
            raise FedradError(f"{command} resolves to {found}, not the node's gate {want}; refusing to start")
