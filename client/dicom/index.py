"""Index a hospital's DICOM folder: one record per usable image, one reason per skipped file.

The folder is walked at any depth; every regular file is a candidate whatever its name
(``.dcm`` or not). DICOMDIR files, the labels CSV and the cache folder are not images.
Headers are read in parallel (everything before the pixel data only), every file is content
hashed (sha256), and labels are joined from the CSV or a DICOM attribute.

Two files are written into the cache folder:

* ``index.json``: the records and the skipped files with their reasons. It names files by
  their path relative to the root, and holds no patient identifier or UID (only salted hashes).
* ``index-report.json``: counts only (files seen, indexed, skipped grouped by reason, classes,
  modalities, photometric interpretations, transfer syntaxes, patients); safe to share.

A file whose size and modification time are unchanged since the previous index is not read
again (its header fields are reused); its label is joined again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedrad.common.errors import DataError

from .config import DicomDataConfig
from .identity import node_salt, salted_hash
from .labels import LabelTable, normalise_relpath, read_label_table, resolve_label
from .parallel import map_chunks
from .reader import DICOMDIR_SOP_CLASS, NotDicomError, quiet_pydicom, read_header
from .transfer import transfer_syntax_of, unsupported_reason

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
REPORT_FILE = "index-report.json"
INDEX_VERSION = 1
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
DUPLICATE = "duplicate content"


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

    def summary(self) -> dict[str, Any]:
        """Counts only: safe to log and to share."""
        reasons = Counter(s.reason for s in self.skipped)
        return {
            "files_seen": len(self.records) + len(self.skipped),
            "indexed": len(self.records),
            "skipped": sum(reasons.values()),
            "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
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


def _read_one(path: Path, rel: str, salt: str, label_attribute: str | None) -> Header:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        return Header(rel, 0, 0, reason=UNREADABLE, detail=type(exc).__name__)
    base = Header(rel, st.st_size, st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
    if path.name.upper() == "DICOMDIR":
        return replace(base, reason=DICOMDIR)
    try:
        ds, has_pixels = read_header(data)
    except NotDicomError:
        return replace(base, reason=NOT_DICOM)
    except Exception as exc:  # noqa: BLE001 - a damaged header means the file is unusable
        return replace(base, reason=UNREADABLE, detail=type(exc).__name__)
    with quiet_pydicom():
        try:
            return _describe(ds, has_pixels, base, salt, label_attribute)
        except Exception as exc:  # noqa: BLE001 - malformed values (bad VRs, numbers)
            return replace(base, reason=UNREADABLE, detail=type(exc).__name__)


def _describe(ds: Any, has_pixels: bool, base: Header, salt: str, label_attribute: str | None) -> Header:
    sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return replace(base, reason=DICOMDIR)
    tsyntax = transfer_syntax_of(ds)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    attr = ""
    if label_attribute:
        value = ds.get(label_attribute, "")
        attr = str(value[0] if hasattr(value, "__len__") and not isinstance(value, str) and len(value) else value or "")
    head = replace(
        base,
        patient=salted_hash(salt, str(ds.get("PatientID", "") or "")),
        study=salted_hash(salt, str(ds.get("StudyInstanceUID", "") or "")),
        sop=salted_hash(salt, str(ds.get("SOPInstanceUID", "") or "")),
        modality=str(ds.get("Modality", "") or ""),
        photometric=photometric,
        transfer_syntax=tsyntax,
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        attribute_label=attr.strip(),
    )
    if not has_pixels:
        return replace(head, reason=NO_PIXELS)
    if not tsyntax:
        return replace(head, reason=UNREADABLE, detail="no transfer syntax")
    if (why := unsupported_reason(tsyntax)) is not None:
        return replace(head, reason=why)
    if photometric not in SUPPORTED_PHOTOMETRIC:
        return replace(head, reason=f"unsupported photometric interpretation {photometric or '<missing>'}")
    if head.rows <= 0 or head.cols <= 0:
        return replace(head, reason="no image size in header")
    return head


def read_headers(jobs: Sequence[tuple[str, str, str, str | None]]) -> list[Header]:
    """Worker entry point: ``jobs`` are (absolute path, relative path, salt, label attribute)."""
    return [_read_one(Path(p), rel, salt, attr) for p, rel, salt, attr in jobs]


def walk(root: Path, exclude: Sequence[Path] = ()) -> list[tuple[Path, str]]:
    """Every regular file under ``root`` (any depth, sorted), minus ``exclude`` (files or folders)."""
    excluded = {e.resolve() for e in exclude}
    out: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in filenames:
            p = here / name
            if p.resolve() in excluded or not p.is_file():
                continue
            out.append((p, p.relative_to(root).as_posix()))
    out.sort(key=lambda t: t[1])
    return out


def build_index(
    cfg: DicomDataConfig, *, progress: bool = True, write: bool = True, reuse: bool = True
) -> DicomIndex:
    """Index ``cfg.root``; writes ``index.json`` and ``index-report.json`` into the cache folder."""
    root = cfg.root
    if not root.is_dir():
        raise DataError(f"{root}: DICOM folder not found")
    cache = cfg.cache_path
    salt = node_salt(cache, cfg.hash_salt.get_secret_value() if cfg.hash_salt else None)
    salt_id = salted_hash(salt, "fedrad-salt-id")
    exclude = [cache] + ([cfg.labels_path] if cfg.labels_path is not None else [])
    files = walk(root, exclude)
    previous = _previous_headers(cache, salt_id, cfg.label_attribute) if reuse else {}
    headers: dict[str, Header] = {}
    todo: list[tuple[str, str, str, str | None]] = []
    for path, rel in files:
        old = previous.get(rel)
        if old is not None:
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is not None and st.st_size == old.size and st.st_mtime_ns == old.mtime_ns:
                headers[rel] = old
                continue
        todo.append((str(path), rel, salt, cfg.label_attribute))
    log.info("indexing %d files (%d unchanged since the last index)", len(files), len(files) - len(todo))
    for chunk in map_chunks(read_headers, todo, workers=cfg.workers, description="indexing DICOM", progress=progress):
        for h in chunk:
            headers[h.path] = h
    ordered = [headers[rel] for _, rel in files]
    index = _join_labels(cfg, ordered, salt)
    index.salt_id = salt_id
    if write:
        write_index(index, cache)
    for line in index.summary_lines():
        log.info("index: %s", line)
    return index


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
    cache.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": INDEX_VERSION,
        "salt_id": index.salt_id,
        "label_attribute": index.label_attribute,
        "class_names": list(index.class_names),
        "records": [asdict(r) for r in index.records],
        "skipped": [asdict(s) for s in index.skipped],
        "headers": [asdict(h) for h in index.headers],
    }
    _atomic_write_json(cache / INDEX_FILE, doc)
    _atomic_write_json(cache / REPORT_FILE, {"version": INDEX_VERSION, **index.summary()})


def read_report(cache: Path) -> dict[str, Any]:
    return json.loads((cache / REPORT_FILE).read_text(encoding="utf-8"))


def _previous_headers(cache: Path, salt_id: str, label_attribute: str | None) -> dict[str, Header]:
    path = cache / INDEX_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != INDEX_VERSION or doc.get("salt_id") != salt_id:
            return {}
        if doc.get("label_attribute") != label_attribute:
            return {}
        return {h["path"]: Header(**h) for h in doc.get("headers", [])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ignoring an unreadable previous index (%s)", type(exc).__name__)
        return {}


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["DicomIndex", "IndexRecord", "Skipped", "build_index", "read_report", "walk"]
