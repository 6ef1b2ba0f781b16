"""Indexing: any depth and names, skip reasons grouped and written, labels joined."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from dicom_testutil import pydicom_file
from pydicom.encaps import encapsulate

from fedrad.client.dicom import DicomDataConfig
from fedrad.client.dicom.index import REPORT_FILE, build_index
from fedrad.common.errors import DataError


def _mixed_folder(root: Path) -> None:
    """MR and CT images plus one of each kind of unusable file, at several depths."""
    layout = {
        "a/b/c/mr1": "MR_small.dcm",
        "a/mr2.dcm": "MR_small_RLE.dcm",
        "mr3.DCM": "MR_small_jpeg_ls_lossless.dcm",
        "ct/1": "CT_small.dcm",
        "ct/dose": "rtdose.dcm",  # modality RTDOSE: not a configured class
        "x/plan": "rtplan.dcm",  # no pixel data
        "x/sr.dcm": "test-SR.dcm",  # no pixel data
        "DICOMDIR": "DICOMDIR",
        "notes.txt": "README.txt",  # not DICOM
        "a/copy-of-mr1": "MR_small.dcm",  # same content as a/b/c/mr1
    }
    for rel, name in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pydicom_file(name), root / rel)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds.save_as(root / "ct" / "mpeg", enforce_file_format=True)


def test_summary_groups_every_skipped_file_by_reason(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _mixed_folder(root)
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"), cache_dir=tmp_path / "c")

    index = build_index(cfg, progress=False)

    s = index.summary()
    assert s["files_seen"] == 11
    assert s["indexed"] == 4
    assert s["skipped_by_reason"] == {
        "DICOMDIR (ignored)": 1,
        "duplicate content": 1,
        "not a DICOM file": 1,
        "not an image object (Comprehensive SR Storage)": 1,
        "not an image object (RT Dose Storage)": 1,
        "not an image object (RT Plan Storage)": 1,
        "unsupported transfer syntax 1.2.840.10008.1.2.4.100": 1,
    }
    assert sorted(r.path for r in index.records) == ["a/b/c/mr1", "a/mr2.dcm", "ct/1", "mr3.DCM"]
    assert {r.path: r.label for r in index.records}["ct/1"] == "CT"
    report = json.loads((tmp_path / "c" / REPORT_FILE).read_text())
    assert report["skipped_by_reason"] == s["skipped_by_reason"]
    assert report["files_seen"] == 11


def _labels(root: Path, rows: list[dict[str, str]], fields: list[str]) -> None:
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_csv_labels_by_path_report_missing_and_unknown_labels(tmp_path: Path) -> None:
    root = tmp_path / "site"
    for rel, name in {"p/1": "MR_small.dcm", "p/2": "CT_small.dcm", "p/3": "JPEG2000.dcm"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pydicom_file(name), root / rel)
    _labels(root, [{"path": "p\\1", "label": "yes"}, {"path": "./p/2", "label": "maybe"}], ["path", "label"])
    cfg = DicomDataConfig(root=root, labels_csv=Path("labels.csv"), class_names=("no", "yes"))

    index = build_index(cfg, progress=False)

    assert [(r.path, r.label_index) for r in index.records] == [("p/1", 1)]
    assert index.summary()["skipped_by_reason"] == {
        "fedrad cache folder (ignored)": 1, "labels CSV (not an image)": 1, "no label": 1, "unknown label": 1,
    }


@pytest.mark.parametrize("key", ["sop_instance_uid", "patient_id"])
def test_csv_labels_by_uid_or_patient_id_match_hashed_headers(tmp_path: Path, key: str) -> None:
    root = tmp_path / "site"
    root.mkdir()
    shutil.copyfile(pydicom_file("MR_small.dcm"), root / "mr")
    shutil.copyfile(pydicom_file("CT_small.dcm"), root / "ct")
    attr = {"sop_instance_uid": "SOPInstanceUID", "patient_id": "PatientID"}[key]
    mr, ct = (str(pydicom.dcmread(root / n)[attr].value) for n in ("mr", "ct"))
    _labels(root, [{"id": mr, "y": "1"}, {"id": ct, "y": "0"}], ["id", "y"])
    cfg = DicomDataConfig(
        root=root, labels_csv=Path("labels.csv"), label_key=key, key_column="id", label_column="y",
        class_names=("neg", "pos"),
    )

    index = build_index(cfg, progress=False)

    assert {r.path: r.label for r in index.records} == {"mr": "pos", "ct": "neg"}


def test_class_names_default_to_sorted_csv_values(hospital: Path) -> None:
    cfg = DicomDataConfig(root=hospital, labels_csv=Path("labels.csv"))

    index = build_index(cfg, progress=False)

    assert index.class_names == ("normal", "pneumonia")
    assert len(index.records) == 40


def test_missing_label_column_names_the_file(hospital: Path) -> None:
    cfg = DicomDataConfig(root=hospital, labels_csv=Path("labels.csv"), label_column="diagnosis")

    with pytest.raises(DataError, match="labels.csv.*diagnosis"):
        build_index(cfg, progress=False)


def test_content_indexed_before_is_not_parsed_again(hospital: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DicomDataConfig(root=hospital, labels_csv=Path("labels.csv"), workers=1)
    first = build_index(cfg, progress=False)
    victim = hospital / first.records[0].path
    victim.write_bytes(b"not dicom any more")
    import fedrad.client.dicom.index as index_module

    calls: list[int] = []
    real = index_module.read_headers
    monkeypatch.setattr(index_module, "read_headers", lambda jobs: calls.append(len(jobs)) or real(jobs))

    second = build_index(cfg, progress=False)

    assert calls == [1]
    assert len(second.records) == 39
    assert second.summary()["skipped_by_reason"] == {
        "fedrad cache folder (ignored)": 1, "labels CSV (not an image)": 1, "not a DICOM file": 1,
    }


def test_multi_valued_label_attribute_uses_its_first_value(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    shutil.copyfile(pydicom_file("CT_small.dcm"), root / "ct")  # ImageType ORIGINAL\\PRIMARY\\AXIAL
    cfg = DicomDataConfig(root=root, label_attribute="ImageType", class_names=("ORIGINAL", "DERIVED"),
                          cache_dir=tmp_path / "c")

    index = build_index(cfg, progress=False)

    assert [(r.path, r.label) for r in index.records] == [("ct", "ORIGINAL")]


def test_a_file_refused_for_want_of_a_decoder_is_read_again_once_one_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedrad.client.dicom.index as index_module

    root = tmp_path / "site"
    root.mkdir()
    shutil.copyfile(pydicom_file("MR_small_RLE.dcm"), root / "rle")
    shutil.copyfile(pydicom_file("CT_small.dcm"), root / "ct")
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "c", workers=1)
    real = index_module.unsupported_reason
    rle = "1.2.840.10008.1.2.5"
    monkeypatch.setattr(index_module, "unsupported_reason",
                        lambda uid: f"no decoder installed for transfer syntax {uid}" if uid == rle else real(uid))
    before = build_index(cfg, progress=False)
    monkeypatch.setattr(index_module, "unsupported_reason", real)  # the plugin is installed now

    after = build_index(cfg, progress=False)

    assert [s.reason for s in before.skipped] == [f"no decoder installed for transfer syntax {rle}"]
    assert sorted(r.path for r in after.records) == ["ct", "rle"]
