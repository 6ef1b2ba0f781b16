"""No patient identifier or UID ever reaches logs or reports."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from fedrad.client.dicom import DicomDataConfig, load_dicom_site
from fedrad.client.dicom.cli import main as cli_main


def _identifiers(root: Path) -> set[str]:
    out: set[str] = set()
    for p in root.rglob("IM*"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out |= {
            str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID),
            str(ds.SeriesInstanceUID), str(ds.AccessionNumber), str(ds.PatientBirthDate),
        }
    return out


def test_logs_and_reports_hold_no_identifiers(
    hospital: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _identifiers(hospital)
    assert len(ids) > 40
    cfg = DicomDataConfig(root=hospital, labels_csv=Path("labels.csv"), label_key="sop_instance_uid", workers=1)

    with caplog.at_level(logging.DEBUG):
        site = load_dicom_site(cfg, progress=False)
        code = cli_main(["data", "index", "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
                         "--build-cache", "--no-progress"])

    assert code == 0 and len(site.train) > 0
    texts = {
        "log": caplog.text,
        "terminal": capsys.readouterr().out,
        "origin": site.origin + repr(site.extra),
    }
    for name in ("index-report.json", "load-report.json", "index.json", "pixels-*/rows.json"):
        texts[name] = "".join(p.read_text() for p in cfg.cache_path.glob(name))
    leaks = {where: sorted(i for i in ids if i in text) for where, text in texts.items()}
    assert leaks == {where: [] for where in texts}
    assert "indexed 40 of 42" in caplog.text  # the logs did say something


IDENTIFYING = [
    "PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "StudyInstanceUID", "SOPInstanceUID",
    "AccessionNumber", "StudyDate", "AcquisitionDateTime", "StudyTime", "InstitutionName",
    "ReferringPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber", "StudyID",
]


@pytest.mark.parametrize("keyword", IDENTIFYING)
def test_identifying_label_attributes_are_refused(keyword: str) -> None:
    from fedrad.client.dicom import parse_dicom_config
    from fedrad.common.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_dicom_config({"root": "/data", "label_attribute": keyword}, source="node.yaml")

    text = "\n".join(err.value.problems)
    assert "label_attribute" in text and keyword in text and "labels CSV" in text


@pytest.mark.parametrize("keyword", ["Modality", "ImageComments", "BodyPartExamined", "ViewPosition", "Laterality"])
def test_descriptive_label_attributes_are_allowed(keyword: str) -> None:
    from fedrad.client.dicom import parse_dicom_config

    assert parse_dicom_config({"root": "/data", "label_attribute": keyword}).label_attribute == keyword


def test_cli_refuses_patient_attributes_without_printing_any_identifier(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _identifiers(hospital)

    codes = [
        cli_main(["data", "index", "--root", str(hospital), "--label-attribute", attr, "--no-progress"])
        for attr in ("PatientID", "PatientName")
    ]

    out = capsys.readouterr()
    assert codes == [2, 2]
    assert "PatientName holds a person name" in out.out
    assert not [i for i in ids if i in out.out + out.err]
    assert not (hospital / ".fedrad-cache" / "index.json").exists()  # refused before anything was read


def test_index_json_holds_no_path_and_the_path_file_is_private(tmp_path: Path) -> None:
    import json
    import shutil
    import stat

    from dicom_testutil import pydicom_file

    root = tmp_path / "export"
    rels = ["DOE^JOHN_12345678/1.2.840.99.1/IM1", "SMITH^ANN_87654321/1.2.840.99.2/IM1", "SMITH^ANN_87654321/notes.txt"]
    for rel, name in zip(rels, ["MR_small.dcm", "CT_small.dcm", "README.txt"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pydicom_file(name), root / rel)
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "cache", workers=1)
    from fedrad.client.dicom.index import PATHS_FILE, build_index

    index = build_index(cfg, progress=False)

    doc = (tmp_path / "cache" / "index.json").read_text()
    report = (tmp_path / "cache" / "index-report.json").read_text()
    for fragment in ("DOE", "SMITH", "12345678", "87654321", "1.2.840.99", "IM1", "notes.txt"):
        assert fragment not in doc and fragment not in report
    records = json.loads(doc)["records"]
    assert sorted(r["path_hash"] for r in records) == sorted(index.path_hash(r.path) for r in index.records)
    phi = tmp_path / "cache" / PATHS_FILE
    assert stat.S_IMODE(phi.stat().st_mode) == 0o600
    rows = phi.read_text().splitlines()
    assert rows[0] == "path_hash,status,reason,detail,notes,path"
    assert any(row.endswith(",SMITH^ANN_87654321/notes.txt") and ",not a DICOM file," in row for row in rows)


def test_many_distinct_label_values_are_not_printed_as_class_names(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    rows = list(csv.DictReader((hospital / "labels.csv").read_text().splitlines()))
    with open(hospital / "labels.csv", "w", newline="") as fh:  # a free-text column holding identifiers
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([r["path"], f"DOE^PATIENT{k:03d}"] for k, r in enumerate(rows))

    code = cli_main(["data", "index", "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
                     "--no-progress"])

    out = capsys.readouterr()
    assert code == 3 and "40 distinct label values" in out.out
    assert "DOE^PATIENT" not in out.out + out.err
