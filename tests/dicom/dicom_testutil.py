"""Helpers for the DICOM pipeline tests (imported by plain name: tests/dicom is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest

#: Real DICOM files shipped beside the repository (shared/data/dicom), when present.
SHARED_DICOM = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dicom"


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
