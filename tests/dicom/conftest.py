"""Shared fixtures for the DICOM pipeline tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedrad import bundled_path


@pytest.fixture(scope="session")
def converted_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic hospitals from the bundled PneumoniaMNIST (40 images each); read-only for tests."""
    from fedrad.client.dicom.convert import convert_npz_to_dicom

    out = tmp_path_factory.mktemp("converted")
    convert_npz_to_dicom(
        bundled_path("data", "pneumoniamnist.npz"),
        out,
        num_hospitals=2,
        seed=7,
        max_images_per_hospital=40,
        rle_fraction=0.25,
    )
    return out


@pytest.fixture()
def hospital(converted_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of hospital-1."""
    dst = tmp_path / "hospital-1"
    shutil.copytree(converted_root / "hospital-1", dst)
    return dst
