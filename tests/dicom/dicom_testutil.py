"""Helpers for the DICOM pipeline tests (imported by plain name: tests/dicom is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom.data
import pytest

_REPO = Path(__file__).resolve().parents[2]
#: Real DICOM files shipped beside the repository (shared/data/dicom), when present:
#: $FEDRAD_SHARED_DATA/dicom, else <repo>/shared, <repo>/../shared or <repo>/../../shared.
SHARED_DICOM = next(
    (
        p
        for p in [
            *([Path(os.environ["FEDRAD_SHARED_DATA"]) / "dicom"] if os.environ.get("FEDRAD_SHARED_DATA") else []),
            _REPO / "shared" / "data" / "dicom",
            _REPO.parent / "shared" / "data" / "dicom",
            _REPO.parent.parent / "shared" / "data" / "dicom",
        ]
        if p.is_dir()
    ),
    _REPO.parent / "shared" / "data" / "dicom",
)


def pydicom_file(name: str) -> Path:
    """A pydicom test file, or skip (some are only available online)."""
    try:
        path = pydicom.data.get_testdata_file(name)
    except Exception as exc:  # noqa: BLE001 - network errors when pydicom tries to download
        pytest.skip(f"pydicom test file {name} not available offline ({type(exc).__name__})")
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return Path(path)


def shared_file(name: str) -> Path:
    path = SHARED_DICOM / name
    if not path.is_file():
        pytest.skip(f"{path} absent (shared/data/dicom not checked out beside the repository)")
    return path
