"""Index a hospital's DICOM folder: one record per usable image, one reason per skipped entry.

The folder is walked at any depth (:mod:`.walk`): every entry of the archive (file, link,
folder that cannot be walked) ends in exactly one line: a record (usable) or a skipped
entry with its reason, so ``indexed + skipped == files_seen``. Every regular file is a
candidate whatever its name (``.dcm`` or not). DICOMDIR files, the labels CSV and fedrad
cache folders are not images. Every file is content hashed (sha256) at every index, so
nothing is trusted from size or modification time; the header fields of content already
indexed are reused (found by hash), new content is parsed in parallel (everything before the
pixel data only). Labels are joined from the CSV or a DICOM attribute.

Three files are written into the cache folder:

* ``index.json``: the records and the skipped entries with their reasons. Entries are named by
  a salted hash of their relative path (``path_hash``), patients and UIDs by salted hashes:
  it holds no path, identifier or UID in clear.
* ``index-report.json``: counts only (entries seen, indexed, skipped grouped by reason,
  classes, modalities, photometric interpretations, transfer syntaxes, patients); safe to share.
* ``paths.phi.csv`` (mode 0600): ``path_hash``, status (usable, skipped, or after decoding
  unusable), reason, detail, notes and the relative **path** of every entry, so the operator can
  find the files behind a reason. Paths in real
  exports often hold patient names, IDs or UIDs: this file is **PHI-bearing**, for the node's
  operator only; never share it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedrad.common.errors import DataError

from .chatter import quiet_pydicom
from .config import DicomDataConfig
from .identity import node_salt, salted_hash
from .labels import LabelTable, normalise_relpath, read_label_table, resolve_label
from .parallel import map_chunks
from .reader import DICOMDIR_SOP_CLASS, NotDicomError, read_header
from .sop import is_image_sop_class, non_image_reason
from .transfer import transfer_syntax_of, unsupported_reason
from .walk import walk, walk_archive

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
REPORT_FILE = "index-report.json"
PATHS_FILE = "paths.phi.csv"
INDEX_VERSION = 2
SUPPORTED_PHOTOMETRIC = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
)
DICOMDIR = "DICOMDIR (ignored)"
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable"
NO_PIXELS = "no pixel data"
TRUNCATED = "truncated inside the header"
IMAGE_WITHOUT_PIXELS = "image object without pixel data (truncated or stripped)"
DUPLICATE = "duplicate content"
BAD_LABEL_VALUE = "unusable label attribute value"
_HASH_CHUNK = 1 << 20
#: Most classes inferred from the label values when ``class_names`` is not set.
MAX_INFERRED_CLASSES = 20


@dataclass(frozen=True)
class Header:
    """What a worker learns about one file (no identifier in clear)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str = ""
    #: Skip reason found from the header alone ("" = usable).
    reason: str = ""
    detail: str = ""
    patient: str = ""
    study: str = ""
    sop: str = ""
    modality: str = ""
    photometric: str = ""
    transfer_syntax: str = ""
    rows: int = 0
    cols: int = 0
    frames: int = 1
    attribute_label: str = ""


@dataclass(frozen=True)
class IndexRecord:
    path: str
    sha256: str
    #: Salted hash of the patient ID (falls back to the study UID's, then the file's hash).
    patient: str
    modality: str
    photometric: str
    transfer_syntax: str
    rows: int
    cols: int
    frames: int
    label: str
    label_index: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    detail: str = ""


@dataclass
class DicomIndex:
    root: str
    class_names: tuple[str, ...]
    records: list[IndexRecord]
    skipped: list[Skipped]
    headers: list[Header] = field(default_factory=list)
    salt_id: str = ""
    label_attribute: str | None = None
    folders_walked: int = 0
    #: Salt of the path hashes (never written; see :meth:`path_hash`).
    salt: str = field(default="", repr=False)

    def path_hash(self, rel: str) -> str:
        return "p:" + salted_hash(self.salt, "path:" + rel)

    def summary(self) -> dict[str, Any]:
        """Counts only: safe to log and to share."""
        reasons = Counter(s.reason for s in self.skipped)
        return {
            "files_seen": len(self.records) + len(self.skipped),
            "indexed": len(self.records),
            "skipped": sum(reasons.values()),
            "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "folders_walked": self.folders_walked,
            "class_names": list(self.class_names),
            "images_per_class": {
                name: sum(1 for r in self.records if r.label_index == k) for k, name in enumerate(self.class_names)
            },
            "patients": len({r.patient for r in self.records}),
            "modalities": dict(Counter(r.modality or "?" for r in self.records)),
            "photometric_interpretations": dict(Counter(r.photometric for r in self.records)),
            "transfer_syntaxes": dict(Counter(r.transfer_syntax for r in self.records)),
            "multi_frame_images": sum(1 for r in self.records if r.frames > 1),
        }

    def summary_lines(self) -> list[str]:
        s = self.summary()
        lines = [f"indexed {s['indexed']} of {s['files_seen']} files ({s['patients']} patients)"]
        lines += [f"{reason}: {n}" for reason, n in s["skipped_by_reason"].items()]
        return lines


def file_sha256(path: Path) -> tuple[str, int, int] | OSError:
    """(sha256, size, mtime_ns) of a file's content, or the error reading it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        return exc
    return h.hexdigest(), st.st_size, st.st_mtime_ns


def _read_one(path: Path, rel: str, salt: str, label_attribute: str | None) -> Header:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except OSError as exc:
        return Header(rel, 0, 0, reason=UNREADABLE, detail=type(exc).__name__)
    base = Header(rel, st.st_size, st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
    if path.name.upper() == "DICOMDIR":
        return replace(base, reason=DICOMDIR)
    try:
        head = read_header(data)
    except NotDicomError:
        return replace(base, reason=NOT_DICOM)
    except Exception as exc:  # noqa: BLE001 - a damaged header means the file is unusable
        return replace(base, reason=UNREADABLE, detail=type(exc).__name__)
    with quiet_pydicom():
        try:
            return _describe(head.ds, head.has_pixels, head.truncated, head.at_eof, base, salt, label_attribute)
        except Exception as exc:  # noqa: BLE001 - malformed values (bad VRs, numbers)
            return replace(base, reason=UNREADABLE, detail=type(exc).__name__)


def _text(ds: Any, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - undecodable values
        return ""


def label_value(ds: Any, keyword: str) -> str:
    """The first value of ``keyword`` as text ("" when absent); raises ValueError when unusable."""
    try:
        value = ds.get(keyword, None)
        if value is None:
            return ""
        if isinstance(value, (bytes, bytearray)):
            raise ValueError("binary value")
        if not isinstance(value, str) and hasattr(value, "__iter__"):
            items = list(value)
            value = items[0] if items else ""
        return str(value if value is not None else "").strip()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - undecodable or odd values
        raise ValueError(type(exc).__name__) from None


def _describe(
    ds: Any, has_pixels: bool, truncated: bool, at_eof: bool, base: Header, salt: str, label_attribute: str | None
) -> Header:
    meta = getattr(ds, "file_meta", None)
    media_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return replace(base, reason=DICOMDIR)
    tsyntax = transfer_syntax_of(ds)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    head = replace(
        base,
        patient=salted_hash(salt, _text(ds, "PatientID")),
        study=salted_hash(salt, _text(ds, "StudyInstanceUID")),
        sop=salted_hash(salt, _text(ds, "SOPInstanceUID")),
        modality=_text(ds, "Modality"),
        photometric=photometric,
        transfer_syntax=tsyntax,
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )
    if truncated:
        return replace(head, reason=TRUNCATED)
    sop_class = _text(ds, "SOPClassUID") or media_class
    if (why := non_image_reason(sop_class, head.modality)) is not None:
        return replace(head, reason=why)
    if not has_pixels:
        if at_eof and sop_class and is_image_sop_class(sop_class):
            return replace(head, reason=IMAGE_WITHOUT_PIXELS)
        return replace(head, reason=NO_PIXELS)
    if not tsyntax:
        return replace(head, reason=UNREADABLE, detail="no transfer syntax")
    if (why := unsupported_reason(tsyntax)) is not None:
        return replace(head, reason=why)
    if photometric not in SUPPORTED_PHOTOMETRIC:
        return replace(head, reason=f"unsupported photometric interpretation {photometric or '<missing>'}")
    if head.rows <= 0 or head.cols <= 0:
        return replace(head, reason="no image size in header")
    if label_attribute:
        try:
            head = replace(head, attribute_label=label_value(ds, label_attribute))
        except ValueError as exc:
            return replace(head, reason=BAD_LABEL_VALUE, detail=str(exc))
    return head


def _decoder_since(h: Header) -> bool:
    """The header was refused for want of a decoder that is installed now (so it is read again)."""
    return h.reason.startswith("no decoder installed") and unsupported_reason(h.transfer_syntax) is None



def read_headers(jobs: Sequence[tuple[str, str, str, str | None]]) -> list[Header]:
    """Worker entry point: ``jobs`` are (absolute path, relative path, salt, label attribute)."""
    return [_read_one(Path(p), rel, salt, attr) for p, rel, salt, attr in jobs]


READER_CRASHED = "reader crashed"


def _reader_crashed(job: tuple[str, str, str, str | None]) -> Header:
    return Header(job[1], 0, 0, reason=READER_CRASHED)


def _hash_all(paths: Sequence[Path], workers: int) -> list[tuple[str, int, int] | OSError]:
    """Content hashes of ``paths`` (threads: reading and hashing release the GIL)."""
    if len(paths) < 16 or workers <= 1:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_sha256, paths, chunksize=16))


def build_index(
    cfg: DicomDataConfig, *, progress: bool = True, write: bool = True, reuse: bool = True
) -> DicomIndex:
    """Index ``cfg.root``; writes ``index.json``, ``index-report.json`` and ``paths.phi.csv`` into the cache."""
    root = cfg.root
    if not root.is_dir():
        raise DataError(f"{root}: DICOM folder not found")
    cache = cfg.cache_path
    salt = node_salt(cache, cfg.hash_salt.get_secret_value() if cfg.hash_salt else None)
    salt_id = salted_hash(salt, "fedrad-salt-id")
    walked = walk_archive(root, cache_dir=cache, labels_file=cfg.labels_path)
    previous = _previous_headers(cache, salt_id, cfg.label_attribute) if reuse else {}
    headers: dict[str, Header] = {}
    todo: list[tuple[str, str, str, str | None]] = []
    hashes = _hash_all([e.path for e in walked.files], min(8, 2 * _cores(cfg.workers))) if previous else []
    for k, entry in enumerate(walked.files):
        got = hashes[k] if hashes else None
        if isinstance(got, tuple) and got[0] in previous and not _decoder_since(previous[got[0]]):
            sha, size, mtime = got
            headers[entry.rel] = replace(previous[sha], path=entry.rel, size=size, mtime_ns=mtime)
            continue
        todo.append((str(entry.path), entry.rel, salt, cfg.label_attribute))
    log.info("indexing %d files (%d with content indexed before)", len(walked.files), len(walked.files) - len(todo))
    for chunk in map_chunks(
        read_headers, todo, workers=cfg.workers, description="indexing DICOM", progress=progress, isolate=_reader_crashed
    ):
        for h in chunk:
            headers[h.path] = h
    ordered = [headers[e.rel] for e in walked.files]
    index = _join_labels(cfg, ordered, salt)
    index.skipped.extend(Skipped(p.rel, p.reason, p.detail) for p in walked.problems)
    index.skipped.sort(key=lambda s: s.path)
    index.salt_id = salt_id
    index.salt = salt
    index.folders_walked = walked.folders
    if write:
        write_index(index, cache)
    for line in index.summary_lines():
        log.info("index: %s", line)
    return index


def _cores(workers: int | None) -> int:
    from .parallel import default_workers

    return default_workers(workers)


def _join_labels(cfg: DicomDataConfig, headers: list[Header], salt: str) -> DicomIndex:
    table: LabelTable | None = None
    if cfg.labels_path is not None:
        table = read_label_table(
            cfg.labels_path,
            key_kind=cfg.label_key,
            key_column=cfg.key_column_name,
            label_column=cfg.label_column,
            salt=salt,
        )
    usable = [h for h in headers if not h.reason]
    if cfg.class_names is not None:
        class_names = tuple(cfg.class_names)
    elif table is not None:
        class_names = table.values
    else:
        class_names = tuple(sorted({h.attribute_label for h in usable if h.attribute_label}))
    if cfg.class_names is None and len(class_names) > MAX_INFERRED_CLASSES:
        # Class names are printed and reported: a label source with this many distinct values is more
        # likely an identifier or free text than a diagnosis, so none of its values is shown.
        raise DataError(
            f"{len(class_names)} distinct label values found (more than {MAX_INFERRED_CLASSES}); list the classes "
            "with --classes / class_names (values not shown: they may identify patients)"
        )
    records: list[IndexRecord] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for h in headers:
        if h.reason:
            skipped.append(Skipped(h.path, h.reason, h.detail))
            continue
        if table is not None:
            key = {
                "path": normalise_relpath(h.path),
                "sop_instance_uid": h.sop,
                "study_instance_uid": h.study,
                "patient_id": h.patient,
            }[cfg.label_key]
            value, why = table.lookup(key)
        else:
            value, why = (h.attribute_label or None), (None if h.attribute_label else "no label")
        if value is None:
            skipped.append(Skipped(h.path, why or "no label"))
            continue
        k, why = resolve_label(value, class_names)
        if k is None:
            skipped.append(Skipped(h.path, why or "unknown label"))
            continue
        if h.sha256 in seen:
            skipped.append(Skipped(h.path, DUPLICATE))
            continue
        seen[h.sha256] = h.path
        patient = h.patient or (f"study:{h.study}" if h.study else f"file:{h.sha256[:16]}")
        records.append(
            IndexRecord(
                path=h.path,
                sha256=h.sha256,
                patient=patient,
                modality=h.modality,
                photometric=h.photometric,
                transfer_syntax=h.transfer_syntax,
                rows=h.rows,
                cols=h.cols,
                frames=h.frames,
                label=class_names[k],
                label_index=k,
            )
        )
    if len(class_names) < 2:
        log.warning("only %d class(es) found; a classifier needs at least 2", len(class_names))
    return DicomIndex(
        root=str(cfg.root),
        class_names=class_names,
        records=records,
        skipped=skipped,
        headers=headers,
        label_attribute=cfg.label_attribute,
    )


def write_index(index: DicomIndex, cache: Path) -> None:
    """``index.json`` (paths hashed), ``index-report.json`` (counts) and ``paths.phi.csv`` (0600)."""
    cache.mkdir(parents=True, exist_ok=True)

    def hashed(row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        row["path_hash"] = index.path_hash(row.pop("path"))
        return row

    doc = {
        "version": INDEX_VERSION,
        "salt_id": index.salt_id,
        "label_attribute": index.label_attribute,
        "class_names": list(index.class_names),
        "records": [hashed(asdict(r)) for r in index.records],
        "skipped": [hashed(asdict(s)) for s in index.skipped],
        "headers": [_header_doc(h) for h in index.headers if h.sha256],
    }
    _atomic_write(cache / INDEX_FILE, json.dumps(doc, indent=1))
    _atomic_write(cache / REPORT_FILE, json.dumps({"version": INDEX_VERSION, **index.summary()}, indent=1))
    write_paths_file(index, cache)


def write_paths_file(
    index: DicomIndex,
    cache: Path,
    *,
    failed: dict[str, tuple[str, str]] | None = None,
    notes: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """``paths.phi.csv`` (mode 0600, PHI-bearing): one row per entry with its outcome and its path.

    With ``failed``/``notes`` (by content hash, from decoding) records that could not be used
    are ``unusable`` with their reason, and usable ones list their notes (``; ``-separated).
    """
    failed, notes = failed or {}, notes or {}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path_hash", "status", "reason", "detail", "notes", "path"])
    rows = [(s.path, "skipped", s.reason, s.detail, "") for s in index.skipped]
    for r in index.records:
        if r.sha256 in failed:
            rows.append((r.path, "unusable", *failed[r.sha256], ""))
        else:
            rows.append((r.path, "usable", "", "", "; ".join(notes.get(r.sha256, ()))))
    for rel, status, reason, detail, note in sorted(rows):
        writer.writerow([index.path_hash(rel), status, reason, detail, note, rel])
    _atomic_write(cache / PATHS_FILE, buf.getvalue(), mode=0o600)


def _header_doc(h: Header) -> dict[str, Any]:
    """A header as stored for reuse by content: no path, size or time (they belong to the file, not the content)."""
    doc = asdict(h)
    for key in ("path", "size", "mtime_ns"):
        doc.pop(key)
    return doc


def read_report(cache: Path) -> dict[str, Any]:
    return json.loads((cache / REPORT_FILE).read_text(encoding="utf-8"))


def _previous_headers(cache: Path, salt_id: str, label_attribute: str | None) -> dict[str, Header]:
    """Header fields of content indexed before, by sha256 (same salt and label attribute only)."""
    path = cache / INDEX_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != INDEX_VERSION or doc.get("salt_id") != salt_id:
            return {}
        if doc.get("label_attribute") != label_attribute:
            return {}
        out: dict[str, Header] = {}
        for h in doc.get("headers", []):
            head = Header(path="", size=0, mtime_ns=0, **h)
            if head.sha256 and head.reason != UNREADABLE:
                out[head.sha256] = head
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring an unreadable previous index (%s)", type(exc).__name__)
        return {}


def _atomic_write(path: Path, text: str, *, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


__all__ = ["DicomIndex", "IndexRecord", "Skipped", "build_index", "read_report", "walk", "walk_archive"]
