"""``fedrad-node predict``: the model card, the hospital's own DICOM images, metrics equal the coordinator's."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad import bundled_path
from fedrad.client.commands.predict import main
from fedrad.client.dicom import DicomDataConfig, SplitConfig, load_dicom_site
from fedrad.client.dicom.convert import convert_npz_to_dicom
from fedrad.client.training.predict import load_model
from fedrad.common.errors import ModelError
from fedrad.common.evaluation import evaluate
from fedrad.common.model_card import model_card, read_model_card, state_dict_sha256
from fedrad.server.governance import state_dict_hash

from .conftest import CLASSES, Trained, save_model, study_dict


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted hospital folder (PneumoniaMNIST written as CR/DX DICOM with a labels CSV)."""
    out = tmp_path_factory.mktemp("sites")
    convert_npz_to_dicom(bundled_path("data", "pneumoniamnist.npz"), out, num_hospitals=2, seed=5,
                         max_images_per_hospital=80, rle_fraction=0.25)
    return out / "hospital-1"


def _dicom_cfg(root: Path, **kw: object) -> DicomDataConfig:
    return DicomDataConfig(root=root, labels_csv=Path("labels.csv"), class_names=tuple(CLASSES), workers=1,
                           split=SplitConfig(train=1.0, val=0.0, test=0.0), **kw)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_model_card_round_trips_and_hashes_the_weights_like_governance(trained: Trained, tmp_path: Path) -> None:
    cfg = _dicom_cfg(tmp_path)
    card = model_card(study_dict=study_dict(source="dicom"), class_names=CLASSES, threshold=0.37,
                      state_dict=trained.model.state_dict(), preprocess_settings=cfg.preprocess_settings(),
                      preprocess_hash=cfg.preprocess_hash(), study_id="abc")

    got = read_model_card({"state_dict": trained.model.state_dict(), "model_card": card})

    assert got.threshold == pytest.approx(0.37) and got.class_names == tuple(CLASSES)
    assert (got.image_size, got.channels, got.data_source) == (28, 1, "dicom")
    assert got.preprocess_hash == cfg.preprocess_hash() and got.preprocess == cfg.preprocess_settings()
    assert got.weights_sha256 == state_dict_hash(trained.model.state_dict()) == state_dict_sha256(trained.model.state_dict())
    assert got.model_name == "cnn" and not got.legacy


def test_model_card_refuses_bad_input() -> None:
    with pytest.raises(ModelError, match="threshold"):
        model_card(study_dict=study_dict(), class_names=CLASSES, threshold=1.5)
    with pytest.raises(ModelError, match="class names"):
        model_card(study_dict=study_dict(), class_names=["a"], threshold=0.5)
    with pytest.raises(ModelError, match="both"):
        model_card(study_dict=study_dict(), class_names=CLASSES, threshold=0.5, preprocess_hash="00")


def test_todays_model_file_reads_with_a_default_threshold_and_a_warning(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save_model(tmp_path / "model.pt", trained.model)

    with caplog.at_level(logging.WARNING):
        model, card = load_model(path)

    assert card.legacy and card.threshold == 0.5 and "default" in card.threshold_source
    assert card.model_options == {"widths": [8, 16, 32], "dense": 32} and card.class_names == tuple(CLASSES)
    assert any("no operating threshold" in r.getMessage() for r in caplog.records)
    assert isinstance(model, torch.nn.Module)


def test_altered_weights_are_refused(trained: Trained, tmp_path: Path) -> None:
    card = model_card(study_dict=study_dict(), class_names=CLASSES, threshold=0.5, state_dict=trained.model.state_dict())
    state = {k: v.clone() for k, v in trained.model.state_dict().items()}
    next(iter(state.values())).add_(0.01)
    torch.save({"state_dict": state, "study": study_dict(), "class_names": CLASSES, "model_card": card},
               tmp_path / "model.pt")

    with pytest.raises(ModelError, match="does not match the model card"):
        load_model(tmp_path / "model.pt")


def test_predict_on_converted_dicom_gives_the_coordinators_metrics(trained: Trained, hospital: Path, tmp_path: Path) -> None:
    model_pt = save_model(tmp_path / "model.pt", trained.model)
    out = tmp_path / "pred"

    rc = main(["predict", "--model", str(model_pt), "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
               "--out", str(out), "--workers", "1", "--device", "cpu"])

    assert rc == 0
    site = load_dicom_site(_dicom_cfg(hospital), progress=False)
    ev = evaluate(trained.model, site.train, device=torch.device("cpu"), batch_size=64)
    got = json.loads((out / "metrics.json").read_text())
    assert got["images"] == ev.num_examples == 80
    for key in ("auc", "sensitivity", "specificity", "accuracy", "f1"):
        assert got[key] == pytest.approx(getattr(ev.summary, key), abs=1e-12), key
    assert got["confusion"] == ev.confusion.tolist()
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 80 and (out / "roc.png").stat().st_size > 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", r["image_id"]) for r in rows)
    assert all(abs(float(r["p_normal"]) + float(r["p_pneumonia"]) - 1) < 1e-5 for r in rows)


def test_decisions_use_the_cards_threshold_and_plain_paths_are_the_relative_paths(
    trained: Trained, hospital: Path, tmp_path: Path
) -> None:
    card = model_card(study_dict=study_dict(), class_names=CLASSES, threshold=0.9, state_dict=trained.model.state_dict())
    model_pt = save_model(tmp_path / "model.pt", trained.model, card=card)

    rc = main(["predict", "--model", str(model_pt), "--root", str(hospital), "--out", str(tmp_path / "p"),
               "--paths", "plain", "--workers", "1", "--device", "cpu"])

    assert rc == 0
    rows = _rows(tmp_path / "p" / "predictions.csv")
    labelled = {r["path"] for r in _rows(hospital / "labels.csv")}
    assert {r["image_id"] for r in rows} == labelled  # every image, no labels needed
    assert not (tmp_path / "p" / "metrics.json").exists()
    decided = np.array([r["decision"] == "pneumonia" for r in rows])
    p1 = np.array([float(r["p_pneumonia"]) for r in rows])
    np.testing.assert_array_equal(decided, p1 >= 0.9)
    assert decided.sum() < (p1 >= 0.5).sum()  # the threshold changed some decisions


def test_predict_refuses_a_model_whose_preprocessing_differs(trained: Trained, hospital: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    other = _dicom_cfg(hospital, window={"center": 1000.0, "width": 500.0})
    card = model_card(study_dict=study_dict(source="dicom"), class_names=CLASSES, threshold=0.5,
                      state_dict=trained.model.state_dict(), preprocess_settings=other.preprocess_settings(),
                      preprocess_hash=other.preprocess_hash())
    model_pt = save_model(tmp_path / "model.pt", trained.model, card=card)
    own = tmp_path / "node-dicom.yaml"
    own.write_text(f"root: {hospital}\nlabels_csv: labels.csv\nimage_size: 28\n", encoding="utf-8")

    rc = main(["predict", "--model", str(model_pt), "--root", str(hospital), "--dicom-config", str(own),
               "--out", str(tmp_path / "p"), "--workers", "1"])

    assert rc == 3
    err = capsys.readouterr().err
    assert "does not match" in " ".join(err.split()) and "window" in err
    assert not (tmp_path / "p" / "predictions.csv").exists()

    big = tmp_path / "big.yaml"
    big.write_text(f"root: {hospital}\nlabels_csv: labels.csv\nimage_size: 32\n", encoding="utf-8")
    plain = save_model(tmp_path / "plain.pt", trained.model)
    rc = main(["predict", "--model", str(plain), "--root", str(hospital), "--dicom-config", str(big),
               "--out", str(tmp_path / "p"), "--workers", "1"])
    assert rc == 3 and "image size: model 28, data 32" in " ".join(capsys.readouterr().err.split())


def test_predict_with_the_cards_dicom_preprocessing_runs(trained: Trained, hospital: Path, tmp_path: Path) -> None:
    cfg = _dicom_cfg(hospital)
    card = model_card(study_dict=study_dict(source="dicom"), class_names=CLASSES, threshold=0.5,
                      state_dict=trained.model.state_dict(), preprocess_settings=cfg.preprocess_settings(),
                      preprocess_hash=cfg.preprocess_hash())
    model_pt = save_model(tmp_path / "model.pt", trained.model, card=card)

    rc = main(["predict", "--model", str(model_pt), "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
               "--out", str(tmp_path / "p"), "--workers", "1"])

    assert rc == 0
    summary = json.loads((tmp_path / "p" / "predict-summary.json").read_text())
    assert summary["preprocess_hash"] == cfg.preprocess_hash()


def test_predict_on_an_npz_split_matches_evaluate(trained: Trained, tmp_path: Path) -> None:
    model_pt = save_model(tmp_path / "model.pt", trained.model)

    rc = main(["predict", "--model", str(model_pt), "--root", str(bundled_path("data", "pneumoniamnist.npz")),
               "--split", "test", "--out", str(tmp_path / "p"), "--device", "cpu"])

    assert rc == 0
    ev = evaluate(trained.model, trained.test, device=torch.device("cpu"))
    got = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert got["auc"] == pytest.approx(ev.summary.auc) and got["confusion"] == ev.confusion.tolist()
    assert _rows(tmp_path / "p" / "predictions.csv")[0]["image_id"] == "test:0"


def test_a_card_without_a_chosen_threshold_says_so() -> None:
    card = read_model_card({"state_dict": {}, "model_card": model_card(study_dict=study_dict(), class_names=CLASSES,
                                                                        threshold=None)})
    assert card.threshold == 0.5 and "default" in card.threshold_source
    three = model_card(study_dict=study_dict(), class_names=["a", "b", "c"], threshold=0.4)
    assert three["threshold"] is None and "argmax" in three["threshold_source"]


def test_explain_takes_the_hashed_ids_of_predictions_csv(trained: Trained, hospital: Path, tmp_path: Path) -> None:
    model_pt = save_model(tmp_path / "model.pt", trained.model)
    assert main(["predict", "--model", str(model_pt), "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
                 "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    ids = [r["image_id"] for r in _rows(tmp_path / "p" / "predictions.csv")][:3]

    rc = main(["explain", "--model", str(model_pt), "--root", str(hospital), "--labels", str(hospital / "labels.csv"),
               "--ids", ",".join(ids), "--methods", "gradcam", "--out", str(tmp_path / "ex"), "--workers", "1"])

    assert rc == 0
    rows = _rows(tmp_path / "ex" / "explained.csv")
    assert [r["image_id"] for r in rows] == ids and all(r["true_label"] in CLASSES for r in rows)
    assert (tmp_path / "ex" / "explain-01.png").stat().st_size > 5000
