"""The labels spreadsheet (CSV): read it and match its rows to indexed files.

Keys are matched without ever keeping an identifier: UID and patient-ID keys are salted and
hashed exactly like the headers are (see :mod:`fedrad.client.dicom.identity`), and matched
hash to hash. ``path`` keys are file paths relative to the DICOM root (``/`` or ``\\``).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from fedrad.common.errors import DataError

from .identity import salted_hash

log = logging.getLogger(__name__)

NO_LABEL = "no label"
UNKNOWN_LABEL = "unknown label"
CONFLICTING_LABELS = "conflicting labels"


def normalise_relpath(value: str) -> str:
    p = value.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


@dataclass(frozen=True)
class LabelTable:
    """Label values by (normalised or hashed) key; a key with two different labels maps to None."""

    by_key: dict[str, str | None]
    #: Sorted distinct non-empty label values in the file.
    values: tuple[str, ...]

    def lookup(self, key: str) -> tuple[str | None, str | None]:
        """(label value, skip reason)."""
        if not key or key not in self.by_key:
            return None, NO_LABEL
        value = self.by_key[key]
        if value is None:
            return None, CONFLICTING_LABELS
        if not value:
            return None, NO_LABEL
        return value, None


def read_label_table(path: Path, *, key_kind: str, key_column: str, label_column: str, salt: str) -> LabelTable:
    """Read the CSV; raises :class:`DataError` naming the file when it is missing or malformed."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in (key_column, label_column) if c not in columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (has {columns})")
            rows = [(row.get(key_column) or "", (row.get(label_column) or "").strip()) for row in reader]
    except FileNotFoundError:
        raise DataError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read labels CSV ({type(exc).__name__})") from None
    by_key: dict[str, str | None] = {}
    for raw_key, value in rows:
        key = normalise_relpath(raw_key) if key_kind == "path" else salted_hash(salt, raw_key)
        if not key:
            continue
        if key in by_key and by_key[key] != value:
            by_key[key] = None
        else:
            by_key[key] = value
    values = tuple(sorted({v for _, v in rows if v}))
    log.info("labels CSV: %d rows, %d distinct keys, %d distinct labels", len(rows), len(by_key), len(values))
    return LabelTable(by_key=by_key, values=values)


def resolve_label(value: str, class_names: tuple[str, ...]) -> tuple[int | None, str | None]:
    """Class index of a label given by name (or by integer index); (None, reason) when unknown."""
    if value in class_names:
        return class_names.index(value), None
    try:
        k = int(value)
    except ValueError:
        return None, UNKNOWN_LABEL
    if 0 <= k < len(class_names) and str(k) == value.strip():
        return k, None
    return None, UNKNOWN_LABEL
