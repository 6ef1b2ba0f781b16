"""The converter writes realistic DICOM that round-trips through the loader."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom

from fedrad import bundled_path
from fedrad.client.dicom import DicomDataConfig, SplitConfig, load_dicom_site
from fedrad.client.dicom.convert import convert_npz_to_dicom


def _source() -> tuple[np.ndarray, np.ndarray]:
    with np.load(bundled_path("data", "pneumoniamnist.npz")) as a:
        x = np.concatenate([a[f"{s}_images"] for s in ("train", "val", "test")]).astype(np.float32) / 255
        y = np.concatenate([a[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")])
    return x.reshape(len(x), -1), y


def test_round_trip_gives_back_the_images_and_labels(converted_root: Path) -> None:
    src_x, src_y = _source()
    names = ("normal", "pneumonia")
    for folder in sorted(converted_root.glob("hospital-*")):
        cfg = DicomDataConfig(
            root=folder, labels_csv=Path("labels.csv"), class_names=names, workers=1,
            split=SplitConfig(train=0.8, val=0.2, test=0.0), cache_dir=folder.parent / f".cache-{folder.name}",
        )
        site = load_dicom_site(cfg, progress=False)
        assert site.test is None and site.class_names == names
        for split in (site.train, site.val):
            got = np.asarray(split.images).reshape(len(split), -1)
            dist = np.abs(got[:, None, :] - src_x[None, :, :]).max(axis=2)
            nearest = dist.argmin(axis=1)
            assert dist.min(axis=1).max() < 1e-3, "decoded image differs from its source"
            np.testing.assert_array_equal(split.labels, src_y[nearest])


def test_headers_look_like_a_hospital_export(converted_root: Path) -> None:
    folder = converted_root / "hospital-1"
    with open(folder / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    headers = [pydicom.dcmread(folder / r["path"], stop_before_pixels=True) for r in rows]

    assert len(rows) == 40
    assert {h.Modality for h in headers} == {"CR", "DX"}
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {(h.BitsAllocated, h.BitsStored) for h in headers} == {(16, 12)}
    assert all("RescaleSlope" in h and "WindowCenter" in h for h in headers)
    per_patient = Counter(h.PatientID for h in headers)
    assert len(per_patient) >= 8 and max(per_patient.values()) > 1
    assert all(1 <= n <= 4 for n in per_patient.values())
    assert [str(h.SOPInstanceUID) for h in headers] == [r["sop_instance_uid"] for r in rows]
    assert any(not r["path"].endswith(".dcm") for r in rows) and any(r["path"].endswith(".dcm") for r in rows)


def test_output_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    npz = bundled_path("data", "pneumoniamnist.npz")
    a = convert_npz_to_dicom(npz, tmp_path / "a", num_hospitals=1, seed=3, max_images_per_hospital=12)
    b = convert_npz_to_dicom(npz, tmp_path / "b", num_hospitals=1, seed=3, max_images_per_hospital=12)
    c = convert_npz_to_dicom(npz, tmp_path / "c", num_hospitals=1, seed=4, max_images_per_hospital=12)

    text = [(f[0] / "labels.csv").read_text() for f in (a, b, c)]

    assert [p.name for p in a] == ["hospital-1"]
    assert text[0] == text[1] != text[2]
