"""Decoding and preprocessing of real files against pydicom's own reference values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_testutil import pydicom_file, shared_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from fedrad.client.dicom.decode import (
    DECODE_FAILED,
    NO_PIXELS,
    NOT_DICOM,
    Preprocess,
    decode_dataset,
    decode_file,
    frame_index,
    grey_to_unit,
    pad_and_resize,
)

MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_lossless_syntaxes_decode_to_the_uncompressed_reference(name: str) -> None:
    settings = Preprocess(image_size=64, channels=1)
    reference = decode_file(pydicom_file("MR_small.dcm"), settings)

    result = decode_file(pydicom_file(name), settings)

    assert result.reason is None, result
    np.testing.assert_allclose(result.image, reference.image, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    ["JPEG2000.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jpeg_gdcm.dcm"],
)
def test_compressed_syntaxes_decode_like_pydicom(name: str) -> None:
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array
    settings = Preprocess(image_size=max(ds.Rows, ds.Columns), channels=1, clip_percentiles=(0.0, 100.0))

    result = decode_file(path, settings)

    assert result.reason is None, result
    if expected.ndim == 2:  # grey: percentiles 0/100 = min-max scaling of the modality values
        values = apply_modality_lut(expected, ds).astype(np.float64)
        ref = (values - values.min()) / (values.max() - values.min())
        ref = pad_and_resize(ref[None].astype(np.float32), settings.image_size)
        np.testing.assert_allclose(result.image, ref, atol=1e-5)
    else:
        assert result.image.shape == (1, settings.image_size, settings.image_size)


def test_first_window_in_file_matches_the_dicom_linear_formula() -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)

    out = grey_to_unit(ds.pixel_array, ds, Preprocess())

    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_configured_window_overrides_the_file() -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = np.clip((x - (40 - 0.5)) / (400 - 1) + 0.5, 0.0, 1.0)

    out = grey_to_unit(ds.pixel_array, ds, Preprocess(window=(40.0, 400.0)))

    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_percentile_clipping_when_the_file_has_no_window() -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))  # no window, no VOI LUT
    x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    lo, hi = np.percentile(x, [2.0, 98.0])

    out = grey_to_unit(ds.pixel_array, ds, Preprocess(clip_percentiles=(2.0, 98.0)))

    np.testing.assert_allclose(out, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-9)
    assert out.min() == 0.0 and out.max() == 1.0


def test_monochrome1_is_inverted() -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    settings = Preprocess(image_size=128)
    as_mono2 = decode_dataset(ds, settings).image
    ds.PhotometricInterpretation = "MONOCHROME1"

    as_mono1 = decode_dataset(ds, settings).image

    np.testing.assert_allclose(as_mono1, 1.0 - as_mono2, atol=1e-6)


def test_real_monochrome1_radiograph_is_inverted() -> None:
    ds = pydicom.dcmread(shared_file("DX_MONO1_966_fixed.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    settings = Preprocess(image_size=32)
    inverted = decode_dataset(ds, settings).image
    ds.PhotometricInterpretation = "MONOCHROME2"

    plain = decode_dataset(ds, settings).image

    inside = np.s_[:, :, 2:-2]  # 2128 x 2000: the zero padding is in the outer columns
    np.testing.assert_allclose(inverted[inside] + plain[inside], 1.0, atol=1e-5)
    assert abs(float(inverted.mean()) - float(plain.mean())) > 0.05


@pytest.mark.parametrize(
    ("name", "photometric"),
    [
        ("CR_MONO2_RG2.dcm", "MONOCHROME2"),
        ("DX_MONO1_966_fixed.dcm", "MONOCHROME1"),
        ("CT_brain1_ybr.dcm", "RGB"),
        ("US_RGB_US1_J2KR.dcm", "RGB"),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_real_files_preprocess_to_unit_range(name: str, photometric: str, channels: int) -> None:
    path = shared_file(name)

    result = decode_file(path, Preprocess(image_size=48, channels=channels))

    assert result.reason is None, result
    img = result.image
    assert img.shape == (channels, 48, 48) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.01, "image is (nearly) constant"


def test_ybr_is_converted_to_rgb_like_pydicom() -> None:
    path = pydicom_file("SC_ybr_full_422_uncompressed.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) / 255.0  # pydicom converts to RGB by default

    result = decode_file(path, Preprocess(image_size=ds.Rows, channels=3))

    np.testing.assert_allclose(result.image, np.moveaxis(expected, -1, 0), atol=1e-6)


def test_palette_colour_goes_through_the_colour_lut() -> None:
    path = pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    rgb /= 255.0 if rgb.dtype == np.uint8 or rgb.max() <= 255 else 65535.0
    expected = pad_and_resize(np.moveaxis(rgb, -1, 0).astype(np.float32), 64)

    result = decode_file(path, Preprocess(image_size=64, channels=3))

    assert result.reason is None
    np.testing.assert_allclose(result.image, expected, atol=1e-5)


def test_rgb_to_one_channel_is_luma() -> None:
    path = pydicom_file("SC_rgb_small_odd.dcm")  # 3x3 RGB
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114])

    result = decode_file(path, Preprocess(image_size=3, channels=1))

    np.testing.assert_allclose(result.image[0], luma, atol=1e-6)


@pytest.mark.parametrize(("policy", "expected_frame"), [("first", 0), ("middle", 7), ("last", 14)])
def test_frame_policy_picks_one_frame_of_a_multiframe_image(policy: str, expected_frame: int) -> None:
    path = pydicom_file("rtdose.dcm")  # 15 frames of 10x10 (an RT dose grid: relabelled as a multi-frame image)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
    ds.Modality = "OT"
    assert frame_index(int(ds.NumberOfFrames), policy) == expected_frame
    frame = pixel_array(ds, index=expected_frame)
    values = apply_modality_lut(frame, ds).astype(np.float64)
    ref = (values - values.min()) / (values.max() - values.min())

    result = decode_dataset(ds, Preprocess(image_size=10, frame_policy=policy, clip_percentiles=(0.0, 100.0)))

    np.testing.assert_allclose(result.image[0], ref, atol=1e-6)


def test_pad_to_square_is_centred_then_resized() -> None:
    img = np.ones((1, 2, 4), dtype=np.float32)

    out = pad_and_resize(img, 4)

    assert out.shape == (1, 4, 4)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_array_equal(out[0, 3], 0.0)
    np.testing.assert_array_equal(out[0, 1:3], 1.0)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", DECODE_FAILED),
        ("JPEG2000-embedded-sequence-delimiter.dcm", DECODE_FAILED),
        ("rtplan.dcm", "not an image object (RT Plan Storage)"),
        ("rtplan_truncated.dcm", "not an image object (RT Plan Storage)"),
        ("README.txt", NOT_DICOM),
        ("crayons.icc", NOT_DICOM),
        ("test-SR.dcm", "not an image object (Comprehensive SR Storage)"),
        ("badVR.dcm", "not an image object (RT Dose Storage)"),
        ("rtdose.dcm", "not an image object (RT Dose Storage)"),
        ("liver_1frame.dcm", "not an image object (Segmentation Storage)"),
    ],
)
def test_broken_files_give_a_reason_not_an_exception(name: str, reason: str) -> None:
    result = decode_file(pydicom_file(name), Preprocess())

    assert result.image is None
    assert result.reason == reason


def test_truncated_empty_and_random_files_are_reported(tmp_path: Path) -> None:
    data = pydicom_file("CT_small.dcm").read_bytes()
    cases = {
        "cut-in-pixels": data[: len(data) - 5000],
        "cut-in-header": data[:700],
        "empty": b"",
        "noise": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)

    results = {name: decode_file(tmp_path / name, Preprocess()) for name in cases}

    assert all(r.image is None and r.reason for r in results.values()), results
    assert results["cut-in-pixels"].reason == DECODE_FAILED
    assert results["noise"].reason == NOT_DICOM


def test_an_image_without_pixel_data_is_no_pixel_data() -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData

    assert decode_dataset(ds, Preprocess()).reason == NO_PIXELS
