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
