"""Decoding at least as good as pydicom's, bad header parts ignored with a note, the quality gate."""

from __future__ import annotations

import csv
from pathlib import Path

import dicom_builders as build
import numpy as np
import pydicom
import pytest
from dicom_testutil import pydicom_file
from pydicom.pixels import apply_color_lut, apply_modality_lut

from fedrad.client.dicom import DicomDataConfig, load_dicom_site
from fedrad.client.dicom.decode import (
    NOTE_CONFIGURED_WINDOW_OUTSIDE,
    NOTE_MODALITY_LUT,
    NOTE_VOI_LUT,
    NOTE_WINDOW_OUTSIDE,
    Preprocess,
    decode_dataset,
    decode_file,
    grey_to_unit,
)
from fedrad.client.dicom.index import IMAGE_WITHOUT_PIXELS, TRUNCATED, build_index
from fedrad.client.dicom.quality import CONSTANT, NEAR_CONSTANT

SETTINGS = Preprocess(image_size=64, channels=1)


def _percentile_reference() -> np.ndarray:
    """What CT_small gives as stored (no window: percentile clipping of the rescaled values)."""
    return decode_dataset(pydicom.dcmread(pydicom_file("CT_small.dcm")), SETTINGS).image


def test_empty_modality_lut_item_is_ignored_with_a_note() -> None:
    ds = build.with_empty_modality_lut_item(build.ct())
    with pytest.raises(Exception):
        apply_modality_lut(ds.pixel_array, ds)  # pydicom itself trips over it

    result = decode_dataset(ds, SETTINGS)

    assert result.reason is None, result
    assert result.notes == (NOTE_MODALITY_LUT,)
    np.testing.assert_allclose(result.image, _percentile_reference(), atol=1e-6)  # rescale used instead


def test_modality_lut_with_empty_data_is_ignored_with_a_note() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = build.ct()
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType, item.LUTData = [256, 0, 16], "HU", []
    ds.ModalityLUTSequence = Sequence([item])

    result = decode_dataset(ds, SETTINGS)

    assert result.reason is None and result.notes == (NOTE_MODALITY_LUT,)
    np.testing.assert_allclose(result.image, _percentile_reference(), atol=1e-6)


def test_empty_modality_lut_item_with_a_window_is_not_dropped() -> None:
    ds = build.with_window(build.with_empty_modality_lut_item(build.ct()), 40.0, 400.0)

    result = decode_dataset(ds, SETTINGS)

    assert result.reason is None, result
    assert NOTE_MODALITY_LUT in result.notes


@pytest.mark.parametrize("center", [1e6, -1e6])
def test_stored_window_outside_the_data_falls_back_to_percentiles(center: float) -> None:
    ds = build.with_window(build.ct(), center, 10.0)  # all white (or all black) with the stored window

    result = decode_dataset(ds, SETTINGS)

    assert result.reason is None and result.notes == (NOTE_WINDOW_OUTSIDE,)
    np.testing.assert_allclose(result.image, _percentile_reference(), atol=1e-6)


def test_window_that_keeps_only_a_sliver_of_the_data_falls_back_too() -> None:
    ds = build.ct()
    values = apply_modality_lut(ds.pixel_array, ds)
    lo = float(values.min())
    build.with_window(ds, lo - 49.0, 100.0)  # covers the lowest ~1 unit of the data: near-constant output

    result = decode_dataset(ds, SETTINGS)

    assert result.reason is None and result.notes == (NOTE_WINDOW_OUTSIDE,)


def test_a_good_window_is_kept_without_a_note() -> None:
    ds = build.with_window(build.ct(), 40.0, 400.0)
    x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = np.clip((x - (40 - 0.5)) / (400 - 1) + 0.5, 0.0, 1.0)
    notes: list[str] = []

    out = grey_to_unit(ds.pixel_array, ds, SETTINGS, notes=notes)

    np.testing.assert_allclose(out, expected, atol=1e-9)
    assert notes == []


def test_configured_window_outside_one_file_falls_back_with_a_note() -> None:
    result = decode_dataset(build.ct(), Preprocess(image_size=64, window=(1e6, 10.0)))

    assert result.reason is None and result.notes == (NOTE_CONFIGURED_WINDOW_OUTSIDE,)


def test_empty_voi_lut_item_is_ignored_with_a_note() -> None:
    result = decode_dataset(build.with_empty_voi_lut_item(build.ct()), SETTINGS)

    assert result.reason is None and result.notes == (NOTE_VOI_LUT,)


def test_usable_voi_lut_is_applied_without_notes() -> None:
    ds = build.ct()
    values = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = int(np.percentile(values, 1)), int(np.percentile(values, 99))
    plain = decode_dataset(build.ct(), SETTINGS)

    result = decode_dataset(build.with_inverting_voi_lut(ds, first=lo, entries=hi - lo + 1), SETTINGS)

    assert result.reason is None and result.notes == ()
    corr = np.corrcoef(result.image.ravel(), plain.image.ravel())[0, 1]
    assert corr < -0.9  # the inverting LUT was used, not the percentile fallback


def test_big_endian_palette_colour_decodes_like_the_little_endian_file(tmp_path: Path) -> None:
    little, big = build.big_endian_palette()
    path = build.save_big_endian(big, tmp_path / "palette-be.dcm")
    ds = pydicom.dcmread(path)
    assert ds.original_encoding == (False, False)
    np.testing.assert_array_equal(ds.pixel_array, little.pixel_array)
    assert apply_color_lut(ds.pixel_array, ds).mean() < 0.01 * apply_color_lut(little.pixel_array, little).mean()

    result = decode_file(path, Preprocess(image_size=64, channels=3))

    reference = decode_dataset(little, Preprocess(image_size=64, channels=3))
    assert result.reason is None and reference.reason is None
    np.testing.assert_allclose(result.image, reference.image, atol=1e-6)
    assert result.image.mean() > 0.02


@pytest.mark.parametrize(("uid", "name"), sorted(build.NON_IMAGE_SOP_CLASSES.items()))
def test_objects_that_are_not_images_are_refused_by_sop_class(tmp_path: Path, uid: str, name: str) -> None:
    ds = build.as_sop_class(build.ct(), uid)
    build.save(ds, tmp_path / "site" / "obj")
    cfg = DicomDataConfig(root=tmp_path / "site", label_attribute="Modality", class_names=("CT", "MR"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)
    direct = decode_dataset(ds, SETTINGS)

    reason = f"not an image object ({name})"
    assert [(s.path, s.reason) for s in index.skipped] == [("obj", reason)]
    assert direct.reason == reason


def test_constant_and_near_constant_images_are_refused() -> None:
    constant = build.with_pixels(build.ct(), np.full((128, 128), 1000))
    speck = np.full((128, 128), 1000)
    speck[5, 5] = 1200  # one pixel in 16384: nothing left of it after resizing
    near = build.with_pixels(build.ct(), speck)

    assert decode_dataset(constant, SETTINGS).reason == CONSTANT
    assert decode_dataset(near, SETTINGS).reason == NEAR_CONSTANT
    assert decode_dataset(build.ct(), SETTINGS).reason is None


def test_gate_reasons_reach_the_load_report(tmp_path: Path) -> None:
    root = tmp_path / "site"
    files = {
        "good1": build.ct(),
        "good2": build.with_window(build.ct(), 40.0, 400.0),
        "good3": build.with_empty_modality_lut_item(build.ct()),
        "good4": build.with_window(build.ct(), 1e6, 10.0),
        "flat": build.with_pixels(build.ct(), np.full((128, 128), 7)),
    }
    for k, (name, ds) in enumerate(files.items()):
        ds.PatientID = f"P{k}"
        ds.SOPInstanceUID = f"1.2.3.{k}"
        build.save(ds, root / name)
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([name, "a" if k % 2 else "b"] for k, name in enumerate(files))
    cfg = DicomDataConfig(root=root, labels_csv=tmp_path / "labels.csv", cache_dir=tmp_path / "cache", workers=1,
                          split={"train": 0.5, "val": 0.5, "test": 0.0})

    site = load_dicom_site(cfg, progress=False)

    report = site.extra["report"]
    assert report["unusable_after_decoding"] == {CONSTANT: 1}
    assert report["used_with_notes"] == {NOTE_MODALITY_LUT: 1, NOTE_WINDOW_OUTSIDE: 1}
    assert len(site.train) + len(site.val) == 4
    per_file = {row["path"]: row for row in csv.DictReader((cfg.cache_path / "paths.phi.csv").read_text().splitlines())}
    assert (per_file["flat"]["status"], per_file["flat"]["reason"]) == ("unusable", CONSTANT)
    assert (per_file["good3"]["status"], per_file["good3"]["notes"]) == ("usable", NOTE_MODALITY_LUT)
    assert (per_file["good1"]["status"], per_file["good1"]["notes"]) == ("usable", "")
    again = load_dicom_site(cfg, progress=False).extra["report"]  # from the cache: same notes, same reasons
    assert again["decoded_now"] == 0
    assert again["used_with_notes"] == report["used_with_notes"]
    assert again["unusable_after_decoding"] == report["unusable_after_decoding"]


@pytest.mark.parametrize("cut", [250, 705, 1400])
def test_truncation_inside_the_header_is_called_truncated(tmp_path: Path, cut: int) -> None:
    data = pydicom_file("MR_small.dcm").read_bytes()
    assert data.find(b"\xe0\x7f\x10\x00") > cut  # the pixel data starts later
    root = tmp_path / "site"
    root.mkdir()
    (root / "cut").write_bytes(data[:cut])
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)

    assert [(s.path, s.reason) for s in index.skipped] == [("cut", TRUNCATED)]


def test_image_cut_exactly_before_its_pixel_data_is_not_just_no_pixel_data(tmp_path: Path) -> None:
    data = pydicom_file("MR_small.dcm").read_bytes()
    root = tmp_path / "site"
    root.mkdir()
    (root / "cut").write_bytes(data[: data.find(b"\xe0\x7f\x10\x00")])
    cfg = DicomDataConfig(root=root, label_attribute="Modality", class_names=("MR", "CT"),
                          cache_dir=tmp_path / "cache", workers=1)

    index = build_index(cfg, progress=False)

    assert [(s.path, s.reason) for s in index.skipped] == [("cut", IMAGE_WITHOUT_PIXELS)]


def test_deflate_decodes_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    (root / "dfl").write_bytes(pydicom_file("image_dfl.dcm").read_bytes())  # pydicom's deflated test file
    made = build.deflated(build.ct())
    build.save(made, root / "ct-dfl")
    assert pydicom.dcmread(root / "ct-dfl").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        fh.write("path,label\ndfl,a\nct-dfl,b\n")
    cfg = DicomDataConfig(root=root, labels_csv=tmp_path / "labels.csv", cache_dir=tmp_path / "cache", workers=1,
                          image_size=64, split={"train": 0.5, "val": 0.5, "test": 0.0})

    site = load_dicom_site(cfg, progress=False)

    assert site.extra["report"]["index"]["indexed"] == 2
    assert site.extra["report"]["unusable_after_decoding"] == {}
    images = np.concatenate([site.train.images, site.val.images])
    labels = np.concatenate([site.train.labels, site.val.labels])
    plain = decode_dataset(pydicom.dcmread(pydicom_file("CT_small.dcm")), Preprocess(image_size=64)).image
    np.testing.assert_allclose(images[labels == 1][0], plain, atol=1e-6)
