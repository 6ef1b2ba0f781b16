"""Walk a DICOM archive so that no single entry can abort it.

Every entry under the root ends in exactly one place: a candidate file (a regular file, or a
symbolic link to one), or a :class:`WalkProblem` with its reason (a link loop, a dangling
link, a link to a folder, which is not followed, an unreadable folder, a FIFO, socket or
device, a fedrad cache folder, the labels CSV). Readable folders are walked at any depth and
counted; they are represented by their contents. The walk never follows links to folders, so
it cannot loop or leave the root.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedrad.common.errors import DataError

log = logging.getLogger(__name__)

LINK_LOOP = "symbolic link loop"
DANGLING_LINK = "dangling symbolic link"
LINKED_FOLDER = "symbolic link to a folder (not followed)"
UNREADABLE_FOLDER = "unreadable folder"
UNREADABLE_ENTRY = "unreadable"
NOT_REGULAR = "not a regular file (FIFO, socket or device)"
CACHE_FOLDER = "fedrad cache folder (ignored)"
LABELS_FILE = "labels CSV (not an image)"
#: Folders with this name hold a fedrad cache (the default cache folder name).
CACHE_DIR_NAME = ".fedrad-cache"
#: A folder holding this file is a fedrad cache folder, whatever its name.
CACHE_MARKER = "hash-salt"


@dataclass(frozen=True)
class WalkEntry:
    """A candidate file: ``path`` to open (may be a link), ``rel`` its POSIX path under the root."""

    path: Path
    rel: str


@dataclass(frozen=True)
class WalkProblem:
    rel: str
    reason: str
    detail: str = ""


@dataclass
class WalkResult:
    files: list[WalkEntry] = field(default_factory=list)
    problems: list[WalkProblem] = field(default_factory=list)
    #: Readable folders walked (the root included).
    folders: int = 0


def _identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def walk_archive(root: Path, *, cache_dir: Path | None = None, labels_file: Path | None = None) -> WalkResult:
    """Walk ``root`` (see module doc); raises :class:`DataError` only when the root itself is unusable."""
    try:
        top = os.scandir(root)
    except FileNotFoundError:
        raise DataError(f"{root}: DICOM folder not found") from None
    except NotADirectoryError:
        raise DataError(f"{root}: not a folder") from None
    except OSError as exc:
        raise DataError(f"{root}: cannot read the DICOM folder ({exc.strerror})") from None
    cache_id = _identity(cache_dir)
    labels_id = _identity(labels_file)
    out = WalkResult()
    stack: list[tuple[str, os.ScandirIterator[os.DirEntry[str]] | None]] = [("", top)]
    while stack:
        prefix, it = stack.pop()
        if it is None:
            try:
                it = os.scandir(root / prefix)
            except OSError as exc:
                out.problems.append(WalkProblem(prefix + "/", UNREADABLE_FOLDER, _errno_name(exc)))
                continue
        out.folders += 1
        subfolders: list[str] = []
        try:
            with it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:  # the listing failed part-way
            out.problems.append(WalkProblem(prefix + "/", UNREADABLE_FOLDER, _errno_name(exc)))
            continue
        for entry in entries:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            try:
                kind = _classify(entry, cache_id, labels_id)
            except OSError as exc:
                out.problems.append(WalkProblem(rel, UNREADABLE_ENTRY, _errno_name(exc)))
                continue
            if kind == "dir":
                subfolders.append(rel)
            elif kind == "file":
                out.files.append(WalkEntry(Path(entry.path), rel))
            else:
                out.problems.append(WalkProblem(rel + ("/" if kind == CACHE_FOLDER else ""), kind))
        stack.extend((rel, None) for rel in reversed(subfolders))
    out.files.sort(key=lambda e: e.rel)
    out.problems.sort(key=lambda p: p.rel)
    if out.problems:
        log.info("walk: %d entries that are not candidate files", len(out.problems))
    return out


def _classify(entry: os.DirEntry[str], cache_id: tuple[int, int] | None, labels_id: tuple[int, int] | None) -> str:
    """"dir", "file", or the problem's reason."""
    if entry.is_symlink():
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return LINK_LOOP
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return DANGLING_LINK
            raise
        if stat.S_ISDIR(st.st_mode):
            return LINKED_FOLDER
    else:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if entry.name == CACHE_DIR_NAME or (st.st_dev, st.st_ino) == cache_id:
                return CACHE_FOLDER
            if os.path.isfile(os.path.join(entry.path, CACHE_MARKER)):
                return CACHE_FOLDER
            return "dir"
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR
    if (st.st_dev, st.st_ino) == labels_id:
        return LABELS_FILE
    return "file"


def walk(root: Path, exclude: Sequence[Path] = ()) -> list[tuple[Path, str]]:
    """Candidate files under ``root`` as (path, relative path), sorted; ``exclude``: cache folder, labels."""
    cache = next((p for p in exclude if p.is_dir()), None)
    labels = next((p for p in exclude if p.is_file()), None)
    return [(e.path, e.rel) for e in walk_archive(root, cache_dir=cache, labels_file=labels).files]
