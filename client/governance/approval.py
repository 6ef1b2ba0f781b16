"""Code approval: only apps (Flower App Bundles) the hospital approved run on its data.

In deployment Flower ships the coordinator's app as a FAB (a zip; its identity is the sha256 of
its bytes, ``Fab.hash_str`` / ``Run.fab_hash``) to every SuperNode. Flower's own bundle signing
needs its hub, which hospitals cannot reach, so fedrad builds approval from offline pieces:

* an **allow-list** of FAB hashes in the node's state folder (``approved-apps.json``; atomic
  writes under a lock; every approval and revocation records who, when and which hash; revoked
  records are kept, so the file is also the approval history);
* optionally **installed code only**: the FAB may carry no code at all (no ``.py``, ``.so``, ...)
  and must name fedrad's installed ClientApp, so what runs is exactly the fedrad version the
  hospital installed.

A bundle is refused before anything of it is decompressed if a member name is unsafe (absolute,
a backslash, an empty, ``.`` or ``..`` part) or appears twice (``pyproject.toml`` and
``./pyproject.toml`` are one file once unpacked: the reviewer would read one, Flower load the
other), if a member is encrypted, or if it has too many members or unpacks too large
(:func:`safe_members`); its publisher, name and version must have Flower's forms (they name the
folder Flower unpacks into, and which the gate removes). Any other malformation is a refusal too,
never a crash, and an unapproved bundle is never opened at all (the allow-list is read first).

:func:`verify_app` takes the decision; :mod:`fedrad.client.runtime.gate` enforces it in the node's
``flwr-clientapp`` process before the FAB is installed or any of its code is imported, and
:mod:`fedrad.client.governance.app_folder` makes sure the code Flower then imports is exactly the approved
bundle's (a private copy checked file by file; Flower's shared app folder is never used, and
revoking an app removes its installed folder).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import stat
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedrad.common.durable import atomic_write_json, locked
from fedrad.common.errors import ConfigError, PolicyViolation

log = logging.getLogger(__name__)

#: File name of the allow-list in the node's state folder.
APPROVALS_FILE = "approved-apps.json"
APPROVALS_VERSION = 1
#: The ClientApps an "installed code only" FAB may name (fedrad's, from the installed package): the
#: deployment bundle names the SecAgg+-capable app, which answers plain studies with the plain app.
INSTALLED_CLIENTAPPS = ("fedrad.client.runtime.secagg_app:app", "fedrad.client.runtime.app:app")
#: Files that are (or can carry) executable code; an "installed code only" FAB holds none.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyx", ".so", ".pyd", ".pth", ".dll", ".dylib", ".whl", ".egg", ".zip",
                 ".sh", ".ipynb")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
#: Flower's forms (``flwr.supercore.constant.APP_ID_PATTERN`` / ``APP_VERSION_PATTERN``), no part ``.``/``..``.
_ID_PART_RE = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,128}")
_VERSION_RE = re.compile(r"\d{1,9}\.\d{1,9}\.\d{1,9}")
#: ``module.path:attribute`` (Flower's ClientApp reference).
_APP_REF_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*")
#: Limits on a bundle, checked before anything is decompressed (Flower caps a FAB at 10 MB compressed).
MAX_MEMBERS = 2000
MAX_MEMBER_BYTES = 20 * 1024 * 1024
MAX_TOTAL_BYTES = 50 * 1024 * 1024


class AppNotApproved(PolicyViolation):
    """The app (FAB) Flower was asked to run is not approved by this hospital (rule ``app_approval``)."""

    def __init__(self, message: str) -> None:
        super().__init__("app_approval", message)


class AppApprovalSettings(BaseModel):
    """How the node decides which apps may run (proposed ``apps:`` section of ``node.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Only FABs whose sha256 is on the node's allow-list run (the default; turning it off is explicit).
    require_approval: bool = True
    #: Only FABs that carry no code and name fedrad's installed ClientApp run.
    installed_code_only: bool = False


@dataclass(frozen=True)
class FabInfo:
    """What a FAB says about itself (read from its ``pyproject.toml``; nothing of it is executed)."""

    fab_hash: str
    publisher: str
    name: str
    version: str
    clientapp: str
    code_files: tuple[str, ...]
    size: int

    @property
    def label(self) -> str:
        return f"{self.publisher}/{self.name} {self.version}".strip()


def fab_hash(content: bytes) -> str:
    """A FAB's identity, exactly as Flower computes it (``flwr build``, ``install_from_fab``)."""
    return hashlib.sha256(content).hexdigest()


def check_hash(value: str) -> str:
    """A full, lower-case sha256 hex digest, or :class:`ConfigError`."""
    v = value.strip().lower()
    if not _HASH_RE.fullmatch(v):
        raise ConfigError("<command line>", [f"<command line>: hash: expected 64 hex digits (sha256), got {value!r}"])
    return v


def _bundle_problem(content: bytes, why: str) -> AppNotApproved:
    return AppNotApproved(f"bundle sha256 {fab_hash(content)} is not a readable Flower app bundle ({why})")


def member_name(name: str) -> str:
    """A bundle member's name, checked: relative, ``/``-separated, no empty, ``.`` or ``..`` part, no
    backslash or NUL; a folder's trailing ``/`` dropped. :class:`ValueError` otherwise."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        raise ValueError(f"unsafe member name {name[:80]!r}")
    parts = name.rstrip("/").split("/") if name.endswith("/") else name.split("/")
    if any(part in ("", ".", "..") for part in parts) or (len(name) >= 2 and name[1] == ":"):
        raise ValueError(f"unsafe member name {name[:80]!r}")
    return "/".join(parts)


def safe_members(zf: zipfile.ZipFile, *, content: bytes) -> list[zipfile.ZipInfo]:
    """The bundle's members, or :class:`AppNotApproved` if any name is unsafe (:func:`member_name`) or
    appears twice (Flower's unpacking and ``zipfile`` map ``./a`` and ``a`` to one file: the last
    one wins, so a reviewer and Flower could read different files), if a member is encrypted, or if
    the bundle exceeds :data:`MAX_MEMBERS` members, :data:`MAX_MEMBER_BYTES` per member or
    :data:`MAX_TOTAL_BYTES` in all (sizes as declared; ``zipfile`` never reads past them)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _bundle_problem(content, f"{len(infos)} members, more than {MAX_MEMBERS}")
    seen: set[str] = set()
    total = 0
    for info in infos:
        try:
            name = member_name(info.filename)
        except ValueError as exc:
            raise _bundle_problem(content, str(exc)) from None
        if name.casefold() in seen:
            raise _bundle_problem(content, f"member {name!r} appears more than once")
        seen.add(name.casefold())
        if info.flag_bits & 0x1:
            raise _bundle_problem(content, f"member {name!r} is encrypted")
        if info.file_size > MAX_MEMBER_BYTES:
            raise _bundle_problem(content, f"member {name!r} unpacks to {info.file_size} bytes, more than "
                                           f"{MAX_MEMBER_BYTES}")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise _bundle_problem(content, f"unpacks to more than {MAX_TOTAL_BYTES} bytes")
    return infos


def _metadata(text: bytes) -> tuple[str, str, str, str]:
    """(publisher, name, version, clientapp) from a bundle's pyproject.toml; :class:`ValueError` if
    any is missing or not of the form Flower accepts (they name the folder Flower unpacks into)."""
    pyproject = tomllib.loads(text.decode("utf-8"))
    project = pyproject.get("project", {})
    tool = pyproject.get("tool", {})
    flwr = tool.get("flwr", {}) if isinstance(tool, dict) else {}
    app = flwr.get("app", {}) if isinstance(flwr, dict) else {}
    if not isinstance(project, dict) or not isinstance(app, dict):
        raise ValueError("[project] or [tool.flwr.app] is not a table")
    components = app.get("components", {})
    if not isinstance(components, dict):
        raise ValueError("[tool.flwr.app.components] is not a table")
    publisher, name, version = app.get("publisher", ""), project.get("name", ""), project.get("version", "")
    clientapp = components.get("clientapp", "")
    for field, value, pattern in (("tool.flwr.app.publisher", publisher, _ID_PART_RE),
                                  ("project.name", name, _ID_PART_RE), ("project.version", version, _VERSION_RE),
                                  ("tool.flwr.app.components.clientapp", clientapp, _APP_REF_RE)):
        if not isinstance(value, str) or not (pattern.fullmatch(value) or (field.endswith("clientapp") and not value)):
            raise ValueError(f"{field} = {str(value)[:80]!r} is not valid")
    return publisher, name, version, clientapp


def inspect_fab(content: bytes) -> FabInfo:
    """Read a FAB's metadata and list its code files; :class:`AppNotApproved` if it is not a FAB
    (or is malformed in any way: never any other exception). Member names, count and sizes are
    checked before anything is decompressed (:func:`safe_members`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            infos = safe_members(zf, content=content)
            names = [member_name(i.filename) for i in infos if not i.is_dir()]
            entry = next((i for i in infos if member_name(i.filename) == "pyproject.toml"), None)
            if entry is None:
                raise _bundle_problem(content, "no pyproject.toml")
            publisher, name, version, clientapp = _metadata(zf.read(entry))
    except AppNotApproved:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed bundle (RecursionError included) is a refusal
        raise _bundle_problem(content, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    code = tuple(sorted(n for n in names if n.lower().endswith(CODE_SUFFIXES)))
    return FabInfo(fab_hash=fab_hash(content), publisher=publisher, name=name, version=version, clientapp=clientapp,
                   code_files=code, size=len(content))


def unpacked_clientapp(folder: Path) -> str:
    """The ClientApp reference in an unpacked app folder's ``pyproject.toml`` (what Flower imports);
    :class:`AppNotApproved` if it cannot be read. Opened without following symlinks."""
    try:
        fd = os.open(folder / "pyproject.toml", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            return _metadata(fh.read(MAX_MEMBER_BYTES + 1))[3]
    except Exception as exc:  # noqa: BLE001 - RecursionError included
        raise AppNotApproved(f"the unpacked app's pyproject.toml is unreadable ({type(exc).__name__})") from None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class AppAllowList:
    """The node's allow-list of app hashes (``approved-apps.json``); all mutating calls keyword-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_state_dir(cls, state_dir: str | Path) -> "AppAllowList":
        return cls(Path(state_dir) / APPROVALS_FILE)

    def _read(self) -> dict[str, Any]:
        try:  # never read through a symlink (whoever planted it would choose the approvals)
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {"version": APPROVALS_VERSION, "apps": []}
        except OSError as exc:
            raise ConfigError(str(self.path), [f"{self.path}: app allow-list unreadable ({exc.strerror}; a symlink "
                                               "is refused)"]) from None
        try:
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ValueError("not a regular file")
                data = json.loads(fh.read(MAX_TOTAL_BYTES).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(str(self.path), [f"{self.path}: app allow-list unreadable ({exc})"]) from None
        ok = isinstance(data, dict) and data.get("version") == APPROVALS_VERSION and isinstance(data.get("apps"), list)
        if not ok:
            raise ConfigError(str(self.path),
                              [f"{self.path}: not a fedrad app allow-list (version {APPROVALS_VERSION})"])
        return data

    # ------------------------------------------------------------------ queries
    def records(self) -> list[dict[str, Any]]:
        """Every approval ever made, revoked ones included, oldest first."""
        return [dict(r) for r in self._read()["apps"]]

    def approved(self) -> list[dict[str, Any]]:
        """Approvals in force."""
        return [r for r in self.records() if not r.get("revoked_at")]

    def lookup(self, digest: str) -> dict[str, Any] | None:
        """The approval in force for this FAB hash, or None."""
        for r in self.approved():
            if r.get("fab_hash") == digest:
                return r
        return None

    def resolve(self, prefix: str) -> str:
        """The one approved hash starting with ``prefix`` (at least 8 hex digits)."""
        p = prefix.strip().lower()
        if len(p) < 8 or not re.fullmatch(r"[0-9a-f]+", p):
            raise ConfigError("<command line>", [f"<command line>: hash: give at least 8 hex digits (got {prefix!r})"])
        hits = sorted({str(r["fab_hash"]) for r in self.approved() if str(r["fab_hash"]).startswith(p)})
        if len(hits) != 1:
            what = "no approved app" if not hits else f"{len(hits)} approved apps"
            raise ConfigError(str(self.path), [f"{self.path}: {what} with a hash starting {p!r}"])
        return hits[0]

    # ------------------------------------------------------------------ mutation
    def approve(self, *, digest: str, by: str, note: str = "", info: FabInfo | None = None) -> dict[str, Any]:
        """Approve a FAB hash (idempotent while approved); returns the approval in force."""
        digest = check_hash(digest)
        if info is not None and info.fab_hash != digest:
            raise ConfigError("<command line>", [f"<command line>: bundle hash {info.fab_hash} != {digest}"])
        with locked(self.path):
            data = self._read()
            for r in data["apps"]:
                if r.get("fab_hash") == digest and not r.get("revoked_at"):
                    return dict(r)
            record: dict[str, Any] = {
                "fab_hash": digest,
                "approved_by": by,
                "approved_at": _now(),
                "note": note,
                "publisher": info.publisher if info else None,
                "name": info.name if info else None,
                "version": info.version if info else None,
                "clientapp": info.clientapp if info else None,
                "revoked_by": None,
                "revoked_at": None,
                "revoke_reason": None,
            }
            data["apps"].append(record)
            atomic_write_json(self.path, data)
        log.info("app %s approved", digest[:16])
        return dict(record)

    def revoke(self, *, digest: str, by: str, reason: str = "") -> dict[str, Any]:
        """Revoke the approval in force for a FAB hash (the record is kept, marked revoked)."""
        with locked(self.path):
            data = self._read()
            for r in data["apps"]:
                if r.get("fab_hash") == digest and not r.get("revoked_at"):
                    r.update(revoked_by=by, revoked_at=_now(), revoke_reason=reason)
                    atomic_write_json(self.path, data)
                    log.info("app %s approval revoked", digest[:16])
                    return dict(r)
        raise ConfigError(str(self.path), [f"{self.path}: app {digest} is not approved (nothing to revoke)"])


def verify_app(
    *,
    fab_content: bytes,
    claimed_hash: str | None,
    allow_list: AppAllowList,
    settings: AppApprovalSettings | None = None,
) -> str:
    """Return the FAB's hash if this node may run it, else raise :class:`AppNotApproved`.

    ``claimed_hash`` is the hash Flower announced (``Fab.hash_str`` / ``Run.fab_hash``): it must
    match the bytes, since Flower installs the app under that name. Fails closed: an unreadable
    allow-list refuses every app.
    """
    settings = settings or AppApprovalSettings()
    digest = fab_hash(fab_content)
    if claimed_hash is not None and claimed_hash != digest:
        raise AppNotApproved(f"bundle announced as sha256 {claimed_hash} but its bytes hash to {digest}")
    if settings.require_approval:  # first: an unapproved bundle is never even opened
        try:
            record = allow_list.lookup(digest)
        except ConfigError as exc:
            raise AppNotApproved(f"cannot read the allow-list, refusing every app: {'; '.join(exc.problems)}") from None
        if record is None:
            raise AppNotApproved(f"app sha256 {digest} is not approved on this node (approve it with "
                                 f"`fedrad-node apps approve --config node.yaml BUNDLE.fab` after review)")
    if settings.installed_code_only:
        info = inspect_fab(fab_content)
        if info.code_files:
            shown = ", ".join(info.code_files[:5]) + (" ..." if len(info.code_files) > 5 else "")
            raise AppNotApproved(f"app {info.label} (sha256 {digest}) carries code ({shown}); this node runs only its "
                                 "installed fedrad")
        if info.clientapp not in INSTALLED_CLIENTAPPS:
            raise AppNotApproved(f"app {info.label} (sha256 {digest}) names ClientApp {info.clientapp!r}; this node "
                                 f"runs only {' or '.join(map(repr, INSTALLED_CLIENTAPPS))}")
    return digest
