"""Configuration validation and the data CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from dicom_testutil import shared_file

from fedrad.client.dicom import DicomDataConfig, load_dicom_config, load_dicom_site, parse_dicom_config
from fedrad.client.dicom.cli import add_data_commands, main
from fedrad.common.errors import ConfigError


def test_every_problem_is_reported_at_once() -> None:
    bad = {"root": "x", "labels_csv": "l.csv", "label_attribute": "Modality", "colour": 1,
           "split": {"train": 0.9, "val": 0.3, "test": 0.0}}

    with pytest.raises(ConfigError) as err:
        parse_dicom_config(bad, source="node.yaml")

    text = "\n".join(err.value.problems)
    assert "colour: unknown key" in text
    assert "split: train + val + test must be 1" in text


@pytest.mark.parametrize(
    "change",
    [
        {"label_attribute": "Modality"},  # both label sources
        {"label_attribute": "NotAKeyword", "labels_csv": None},
        {"clip_percentiles": (99.0, 1.0)},
        {"class_names": ("a", "a")},
        {"channels": 2},
        {"window": {"center": 40, "width": 0}},
    ],
)
def test_invalid_settings_are_config_errors(change: dict) -> None:
    with pytest.raises(ConfigError):
        parse_dicom_config({"root": "/data", "labels_csv": "labels.csv", **change})


def test_yaml_relative_root_and_frozen(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text("dicom:\n  root: pacs\n  labels_csv: labels.csv\n  image_size: 64\n")

    cfg = load_dicom_config(tmp_path / "node.yaml")

    assert cfg.root == (tmp_path / "pacs").resolve() and cfg.labels_path == cfg.root / "labels.csv"
    assert cfg.cache_path == cfg.root / ".fedrad-cache"
    with pytest.raises(Exception):
        cfg.image_size = 1  # type: ignore[misc]
    assert cfg.preprocess_hash() != cfg.model_copy(update={"image_size": 32}).preprocess_hash()
    assert cfg.preprocess_hash() == cfg.model_copy(update={"split": {"seed": 5}}).preprocess_hash()


def test_add_data_commands_wires_three_handlers() -> None:
    parser = argparse.ArgumentParser()
    handlers = add_data_commands(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["data", "index", "--root", "/x", "--labels", "l.csv"])

    assert set(handlers) == {"index", "preview", "convert"}
    assert args.handler is handlers["index"]


def test_cli_convert_index_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sites"
    assert main(["data", "convert", "--out", str(out), "--hospitals", "2", "--max-per-hospital", "24",
                 "--seed", "1"]) == 0
    site = out / "hospital-2"
    assert main(["data", "index", "--root", str(site), "--labels", str(site / "labels.csv"), "--no-progress"]) == 0
    png = tmp_path / "p.png"

    code = main(["data", "preview", "--root", str(site), "--labels", str(site / "labels.csv"), "--out", str(png),
                 "--per-class", "3", "--no-progress"])

    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "24 of 26 files usable" in capsys.readouterr().out  # + labels.csv and the cache folder


def test_cli_reports_errors_with_their_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = main(["data", "index", "--root", str(tmp_path / "nope"), "--labels", "l.csv", "--no-progress"])
    invalid = main(["data", "index", "--root", str(tmp_path), "--no-progress"])  # no label source

    assert (missing, invalid) == (3, 2)
    assert "DICOM folder not found" in capsys.readouterr().out


def test_real_files_load_as_a_site(tmp_path: Path) -> None:
    root = shared_file("CR_MONO2_RG2.dcm").parent
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("CR", "DX", "CT", "US"),
                          cache_dir=tmp_path / "cache", image_size=32, channels=3,
                          split={"train": 0.5, "val": 0.5, "test": 0.0}, workers=1)

    site = load_dicom_site(cfg, progress=False)

    assert len(site.train) + len(site.val) == 4
    assert site.channels == 3 and site.image_size == 32
    assert sorted(site.train.labels.tolist() + site.val.labels.tolist()) == [0, 1, 2, 3]


def test_simulated_study_site(converted_root: Path, tmp_path: Path) -> None:
    import shutil

    from fedrad.client.dicom.dataset import load_simulated_site
    from fedrad.common.config import parse_study

    shutil.copytree(converted_root / "hospital-2", tmp_path / "hospital-2")
    study = parse_study({"data": {"source": "dicom", "path": str(tmp_path), "image_size": 28}})

    site = load_simulated_site(tmp_path / "hospital-2", study=study)

    assert len(site.train) + len(site.val) == 40 and site.test is None
    assert site.class_names == ("normal", "pneumonia")


def test_cli_labels_path_is_relative_to_the_current_directory(
    converted_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    site = tmp_path / "pacs-export"
    shutil.copytree(converted_root / "hospital-1", site)
    work = tmp_path / "work"
    work.mkdir()
    shutil.move(site / "labels.csv", work / "labels.csv")  # as in the README: labels in the working directory
    monkeypatch.chdir(work)

    ok = main(["data", "index", "--root", str(site), "--labels", "labels.csv", "--no-progress"])

    assert ok == 0 and "40 of 41 files usable" in capsys.readouterr().out  # + the cache folder
    shutil.move(work / "labels.csv", site / "labels.csv")

    wrong_place = main(["data", "index", "--root", str(site), "--labels", "labels.csv", "--no-progress"])

    out = capsys.readouterr().out
    assert wrong_place == 2
    assert "taken from the current directory" in out and f"pass --labels {site / 'labels.csv'}" in out.replace("\n", "")
