"""Where an approved app's files live on the node, and proof that they are exactly the approved bundle.

Flower 1.41 unpacks a FAB into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<first 8 hex of its
sha256>``, *skips* unpacking when that folder already exists, then reads the ClientApp reference
from the folder's own ``pyproject.toml`` and imports it with the folder first on ``sys.path``. So
whoever could write that folder chose the code, whatever bundle the gate approved.

The node's gate (:mod:`fedrad.client.runtime.gate`) therefore never lets Flower use that shared folder:

* every task unpacks the approved bundle's verified bytes into a fresh private folder
  (:func:`install_private`, ``mkdtemp``: mode 0700, a name nobody can predict) and loads the app
  from there; the folder is removed when the task ends;
* the folder is checked file by file against the bundle (full sha256 of every file, no file
  missing, none extra, no symlinks, no ``__pycache__``; :func:`folder_problems`) after unpacking
  and again right before the app is imported; any difference refuses the task;
* Flower's own folder for the app (pre-placed or left by an older fedrad) is never loaded; if it
  exists it is removed, and if it is not byte for byte the approved bundle the task is refused
  and the refusal audited (someone wrote code onto the node);
* folders of revoked apps are removed (``fedrad-node apps revoke`` and at every gate decision;
  :func:`remove_app_folders`).

On a node with ``apps.installed_code_only`` any code file (:data:`fedrad.client.governance.approval.CODE_SUFFIXES`)
in an app folder is foreign, even if a bundle listed it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import logging
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from fedrad.client.governance.approval import CODE_SUFFIXES, AppNotApproved, fab_hash, member_name, safe_members

log = logging.getLogger(__name__)

#: Flower's folder of installed apps under FLWR_HOME (``flwr.common.constant.APP_DIR``).
APP_DIR = "apps"
#: Hex digits of the FAB hash in Flower's folder name (``flwr.common.constant.FAB_HASH_TRUNCATION``).
HASH_PREFIX = 8
#: The bundle's manifest folder, which Flower deletes after checking it.
_INFO_DIR = ".info"
_PYCACHE = "__pycache__"
_MAX_LISTED = 8
#: Name prefix of the gate's private copies (in the temporary folder).
PRIVATE_PREFIX = "fedrad-app-"
#: File in a private copy's folder (beside, not inside, the app) naming the process that uses it.
_OWNER_FILE = "owner.pid"
#: A private copy whose owner cannot be told is stale after this long; one whose owner is gone, at once.
STALE_AFTER_S = 6 * 3600.0


def flower_home() -> Path:
    """Flower's home folder as Flower resolves it in this process (``$FLWR_HOME`` or ``~/.flwr``)."""
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home())


def flower_app_folder(*, flwr_home: Path, fab_id: str, fab_version: str, digest: str) -> Path:
    """The folder Flower would install ``fab_id`` ``fab_version`` into and load it from."""
    publisher, _, name = fab_id.partition("/")
    return flwr_home / APP_DIR / f"{publisher}.{name}.{fab_version}.{digest[:HASH_PREFIX]}"


def bundle_files(fab_content: bytes) -> dict[str, str]:
    """Relative path -> sha256 of every file a bundle unpacks to (its ``.info`` manifest excluded).

    :class:`AppNotApproved` for a bundle that is not a readable zip, or whose member names are unsafe
    or repeated, or too large (:func:`fedrad.client.governance.approval.safe_members`)."""
    out: dict[str, str] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as zf:
            for member in safe_members(zf, content=fab_content):
                if member.is_dir():
                    continue
                rel = member_name(member.filename)
                if rel.split("/")[0] == _INFO_DIR:
                    continue
                out[rel] = hashlib.sha256(zf.read(member)).hexdigest()
    except AppNotApproved:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed bundle is a refusal
        raise AppNotApproved(f"bundle sha256 {fab_hash(fab_content)} is not a readable app bundle "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return out


def _is_code(rel: str) -> bool:
    return rel.lower().endswith(CODE_SUFFIXES) or _PYCACHE in PurePosixPath(rel).parts


def folder_problems(folder: Path, *, fab_content: bytes, code_allowed: bool) -> list[str]:
    """Every way ``folder`` differs from what the bundle unpacks to; empty when identical.

    A symlink (anywhere), a file the bundle lacks, a missing or changed file, a ``__pycache__``
    (Python would run a cached ``.pyc`` instead of the approved source) are each a problem; with
    ``code_allowed`` False so is every code file, the bundle's own included.
    """
    expected = bundle_files(fab_content)
    problems: list[str] = []
    if folder.is_symlink() or not folder.is_dir():
        return [f"{folder}: not a plain folder"]
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                problems.append(f"{rel}: symlink (foreign)")
            elif name in files:
                seen.add(rel)
                if rel not in expected:
                    problems.append(f"{rel}: not in the approved bundle (foreign{' code' if _is_code(rel) else ''})")
                elif not code_allowed and _is_code(rel):
                    problems.append(f"{rel}: code, and this node runs only its installed fedrad")
                elif _sha256(p) != expected[rel]:
                    problems.append(f"{rel}: content differs from the approved bundle")
            elif name == _PYCACHE:
                problems.append(f"{rel}: compiled code cache (foreign code)")
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink() and d != _PYCACHE]
    problems.extend(f"{rel}: missing" for rel in sorted(set(expected) - seen))
    return problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summarize(problems: list[str]) -> str:
    """The first few problems on one line (for refusals and the audit log)."""
    more = len(problems) - _MAX_LISTED
    return "; ".join(problems[:_MAX_LISTED]) + (f"; ... and {more} more" if more > 0 else "")


def remove_folder(path: Path) -> bool:
    """Remove an app folder (a symlink is unlinked, never followed); True if something was removed
    (False also when another task removed it first)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
            return True
        if path.is_dir():
            shutil.rmtree(path)
            return True
    except FileNotFoundError:
        pass
    return False


def install_private(*, fab_content: bytes, installer: Callable[..., Any], code_allowed: bool) -> Path:
    """Unpack the bundle with Flower's ``installer`` (``install_from_fab``) into a fresh private
    folder only this process knows; return the app folder after checking it file by file.

    Raises :class:`AppNotApproved` (and removes what was unpacked) when the result is not exactly
    the bundle. The private folder is removed when the process exits.
    """
    home = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))  # 0700, unpredictable name, created O_EXCL
    atexit.register(_discard, home)
    _write_owner(home)
    try:
        installed = Path(installer(fab_content, install_dir=home, skip_prompt=True))
    except Exception as exc:  # Flower's own checks (manifest hashes, pyproject) failed: nothing runs
        _discard(home)
        raise AppNotApproved(f"the approved bundle could not be unpacked ({type(exc).__name__}: {exc})") from None
    try:
        installed.resolve().relative_to(home.resolve())
    except ValueError:
        _discard(home)
        raise AppNotApproved(f"the bundle was unpacked outside the gate's private folder ({installed})") from None
    problems = folder_problems(installed, fab_content=fab_content, code_allowed=code_allowed)
    if problems:
        _discard(home)
        raise AppNotApproved(f"the unpacked app is not exactly the approved bundle: {summarize(problems)}")
    return installed


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def remove_app_folders(*, flwr_home: Path, revoked: Iterable[str], approved: Iterable[str]) -> list[Path]:
    """Remove Flower's installed folders of revoked apps (a folder whose hash prefix is also an
    approved app's stays: it might be that app's); return what was removed."""
    apps = flwr_home / APP_DIR
    keep = {d[:HASH_PREFIX] for d in approved}
    gone = {d[:HASH_PREFIX] for d in revoked} - keep
    if not gone or not apps.is_dir():
        return []
    removed = []
    for p in sorted(apps.iterdir()):
        if p.parent != apps or p.name in (".", ".."):  # never anything but a direct child of the apps folder
            continue
        if p.name.rsplit(".", 1)[-1] in gone:
            try:
                if remove_folder(p):
                    removed.append(p)
                    log.info("removed the installed folder of revoked app %s", p.name)
            except OSError as exc:
                log.error("could not remove the installed folder of revoked app %s: %s", p.name, exc)
    return removed


def _write_owner(home: Path) -> None:
    fd = os.open(home / _OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))


def _owner_alive(home: Path) -> bool | None:
    """Whether the process that made this private copy still runs (None: cannot tell)."""
    try:
        fd = os.open(home / _OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            pid = int(fh.read(32).decode("ascii").strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid: ours is gone
        return False
    return True


def sweep_stale_private(*, tmp_dir: Path | None = None, stale_after_s: float = STALE_AFTER_S,
                        now: float | None = None) -> list[Path]:
    """Remove the gate's private copies (``fedrad-app-*``) left behind by tasks that died without
    running their exit handlers (SIGKILL): only real folders (not symlinks) owned by this user whose
    owning process is gone, or whose owner cannot be told and that are older than ``stale_after_s``.
    A copy whose owner still runs is kept. Returns what was removed."""
    base = Path(tempfile.gettempdir()) if tmp_dir is None else tmp_dir
    t = time.time() if now is None else now
    removed: list[Path] = []
    try:
        candidates = [e for e in os.scandir(base) if e.name.startswith(PRIVATE_PREFIX)]
    except OSError:
        return removed
    for entry in candidates:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        path = Path(entry.path)
        alive = _owner_alive(path)
        old = t - st.st_mtime > stale_after_s
        if alive is False or (alive is None and old):
            _discard(path)
            if not path.exists():
                removed.append(path)
                log.info("removed a stale private app copy %s", path.name)
    return removed
