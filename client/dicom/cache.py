"""Preprocess once into an on-disk cache; rebuild only what changed.

Layout, inside the node's cache folder::

    pixels-<settings hash>/      one store per preprocessing setting (see DicomDataConfig.preprocess_hash)
        images.npy               float32 (N, C, H, W), opened as a read-only memmap
        rows.json                the file-content sha256 of each row; failed files with their reason
        pending.npy              (transient) rows decoded by the current build

A row is identified by the content hash of its file, so renaming or moving a file costs
nothing, an edited file is decoded again (whatever its size and modification time: the index
hashes every file, and the decoder hashes the very bytes it decodes and refuses content that
no longer has the indexed hash), and a changed preprocessing setting starts a new store. :meth:`PixelCache.update` decodes only the files whose hash has no row (on all
cores); :meth:`PixelCache.arrange` then lays the rows out in the order asked for (each split
contiguous, so a split is a memmap slice), copying rows that were decoded before.
Files that failed to decode or failed the quality gate are remembered (with their reason) and
not retried; delete the store folder to retry them. The notes of usable rows (fallbacks taken
while decoding, see :mod:`.decode`) are remembered too, so reports count them on cache hits.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrad.common.errors import DataError

from .decode import CHANGED, DecodeResult, Preprocess, decode_file
from .parallel import map_chunks

log = logging.getLogger(__name__)

IMAGES = "images.npy"
ROWS = "rows.json"
PENDING = "pending.npy"


@dataclass
class CacheUpdate:
    decoded: int = 0
    reused: int = 0
    #: sha256 -> (reason, detail) of every requested file that cannot be used.
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: sha256 -> notes of every requested usable file that has any.
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)


def decode_chunk(
    jobs: Sequence[tuple[int, str, Preprocess, str]],
) -> list[tuple[int, np.ndarray | None, str, str, tuple[str, ...]]]:
    """Worker entry point: (row, path, settings, sha256) -> (row, image or None, reason, detail, notes)."""
    out = []
    for row, path, settings, sha in jobs:
        try:
            res = decode_file(path, settings, expected_sha256=sha)
        except Exception as exc:  # noqa: BLE001 - last line of defence: a bad file must not stop the build
            res = DecodeResult(None, "pixel decoding failed", type(exc).__name__)
        out.append((row, res.image, res.reason or "", res.detail, res.notes))
    return out


DECODER_CRASHED = "decoder crashed"


def _crashed(job: tuple[int, str, Preprocess, str]) -> tuple[int, None, str, str, tuple[str, ...]]:
    """The result of a file whose decoding killed its worker process (remembered: not retried)."""
    return (job[0], None, DECODER_CRASHED, "", ())


class PixelCache:
    def __init__(self, cache_dir: Path, settings: Preprocess, settings_hash: str) -> None:
        self.settings = settings
        self.dir = cache_dir / f"pixels-{settings_hash}"
        self.shape = (settings.channels, settings.image_size, settings.image_size)
        self.keys: list[str] = []
        self.failed: dict[str, tuple[str, str]] = {}
        self.notes: dict[str, tuple[str, ...]] = {}
        self._pending_keys: list[str] = []

    # -- state ---------------------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.dir / ROWS
        self.keys, self.failed, self.notes = [], {}, {}
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            keys = list(doc["keys"])
            failed = {k: (str(v[0]), str(v[1])) for k, v in doc.get("failed", {}).items()}
            notes = {k: tuple(str(n) for n in v) for k, v in doc.get("notes", {}).items()}
            if keys:
                images = np.load(self.dir / IMAGES, mmap_mode="r")
                if images.shape != (len(keys), *self.shape) or images.dtype != np.float32:
                    raise ValueError("shape mismatch")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("discarding an unreadable pixel cache (%s); it will be rebuilt", type(exc).__name__)
            for name in (IMAGES, ROWS, PENDING):
                (self.dir / name).unlink(missing_ok=True)
            return
        self.keys, self.failed, self.notes = keys, failed, notes

    def _save_state(self) -> None:
        doc = {
            "shape": list(self.shape),
            "keys": self.keys,
            "failed": {k: list(v) for k, v in self.failed.items()},
            "notes": {k: list(v) for k, v in self.notes.items()},
        }
        tmp = self.dir / (ROWS + ".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, self.dir / ROWS)

    @contextmanager
    def locked(self) -> Iterator["PixelCache"]:
        """Exclusive use of the store (other processes building the same store wait)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self._load_state()
                yield self
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- building ------------------------------------------------------------------------
    def update(
        self, files: Sequence[tuple[str, Path]], *, workers: int | None = None, progress: bool = True
    ) -> CacheUpdate:
        """Make sure every (sha256, path) has a row or a recorded failure; decode only new content."""
        have = set(self.keys)
        stats = CacheUpdate()
        todo: list[tuple[str, Path]] = []
        queued: set[str] = set()
        for sha, path in files:
            if sha in have:
                stats.reused += 1
                if sha in self.notes:
                    stats.notes[sha] = self.notes[sha]
            elif sha in self.failed:
                stats.failed[sha] = self.failed[sha]
            elif sha not in queued:
                queued.add(sha)
                todo.append((sha, path))
        self._pending_keys = []
        if todo:
            self._decode(todo, stats, workers=workers, progress=progress)
        self._save_state()  # failures persist even if arrange() never runs
        log.info(
            "pixel cache: %d decoded, %d reused, %d unusable", stats.decoded, stats.reused, len(stats.failed)
        )
        return stats

    def _decode(
        self, todo: list[tuple[str, Path]], stats: CacheUpdate, *, workers: int | None, progress: bool
    ) -> None:
        pending = np.lib.format.open_memmap(
            self.dir / PENDING, mode="w+", dtype=np.float32, shape=(len(todo), *self.shape)
        )
        ok = np.zeros(len(todo), dtype=bool)
        jobs = [(i, str(path), self.settings, sha) for i, (sha, path) in enumerate(todo)]
        for chunk in map_chunks(
            decode_chunk, jobs, workers=workers, description="decoding DICOM", progress=progress, min_parallel=48,
            uses_torch=True, isolate=_crashed,
        ):
            for row, image, reason, detail, notes in chunk:
                sha = todo[row][0]
                if image is None or image.shape != self.shape:
                    why = reason or "pixel decoding failed"
                    if why != CHANGED:  # says nothing about the content with this hash: not remembered
                        self.failed[sha] = (why, detail)
                    stats.failed[sha] = (why, detail)
                    continue
                pending[row] = image
                if notes:
                    self.notes[sha] = tuple(notes)
                    stats.notes[sha] = tuple(notes)
                ok[row] = True
        pending.flush()
        self._pending_keys = [sha if good else "" for (sha, _), good in zip(todo, ok)]
        stats.decoded = int(ok.sum())
        del pending

    def arrange(self, order: Sequence[str]) -> np.ndarray:
        """Rows for the content hashes in ``order`` (a read-only memmap (len(order), C, H, W))."""
        images_path = self.dir / IMAGES
        if list(order) == self.keys and not any(self._pending_keys) and images_path.exists():
            return np.load(images_path, mmap_mode="r")
        old = np.load(images_path, mmap_mode="r") if images_path.exists() and self.keys else None
        old_row = {k: i for i, k in enumerate(self.keys)}
        pending = np.load(self.dir / PENDING, mmap_mode="r") if any(self._pending_keys) else None
        new_row = {k: i for i, k in enumerate(self._pending_keys) if k}
        tmp = self.dir / (IMAGES + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(order), *self.shape))
        for i, sha in enumerate(order):
            if sha in new_row:
                out[i] = pending[new_row[sha]]  # type: ignore[index]
            elif sha in old_row:
                out[i] = old[old_row[sha]]  # type: ignore[index]
            else:
                raise DataError(f"pixel cache {self.dir}: no row for a requested file (internal error)")
        out.flush()
        del out, old, pending
        os.replace(tmp, images_path)
        self.keys = list(order)
        self._pending_keys = []
        (self.dir / PENDING).unlink(missing_ok=True)
        self._save_state()
        return np.load(images_path, mmap_mode="r")
