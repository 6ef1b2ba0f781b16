"""The preprocessed cache: built once, rebuilt only for what changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom

from fedrad.client.dicom import DicomDataConfig, load_dicom_site
from fedrad.client.dicom.index import build_index


def _cfg(root: Path, **kw: object) -> DicomDataConfig:
    return DicomDataConfig(root=root, labels_csv=Path("labels.csv"), workers=1, **kw)  # type: ignore[arg-type]


def _report(cfg: DicomDataConfig) -> dict:
    return json.loads((cfg.cache_path / "load-report.json").read_text())


def test_second_load_decodes_nothing_and_returns_memmaps(hospital: Path) -> None:
    cfg = _cfg(hospital)
    first = load_dicom_site(cfg, progress=False)

    second = load_dicom_site(cfg, progress=False)

    assert _report(cfg)["decoded_now"] == 0 and _report(cfg)["reused_from_cache"] == 40
    assert isinstance(second.train.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(second.train.images), np.asarray(first.train.images))
    assert second.train.images.dtype == np.float32 and second.train.images.shape[1:] == (1, 28, 28)


def test_a_changed_file_is_the_only_one_decoded_again(hospital: Path) -> None:
    cfg = _cfg(hospital)
    load_dicom_site(cfg, progress=False)
    rel = next(line.split(",")[0] for line in (hospital / "labels.csv").read_text().splitlines()[1:])
    ds = pydicom.dcmread(hospital / rel)
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    ramp = np.tile(np.linspace(0, 4095, ds.Columns), (ds.Rows, 1))  # a left-to-right ramp
    ds.PixelData = np.rint(ramp).astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(hospital / rel, enforce_file_format=True)

    site = load_dicom_site(cfg, progress=False)

    report = _report(cfg)
    assert report["decoded_now"] == 1 and report["reused_from_cache"] == 39
    all_images = np.concatenate([site.train.images, site.val.images, site.test.images])
    is_ramp = [np.all(np.diff(img[0], axis=1) >= 0) and np.ptp(img[0, :, 0]) < 1e-6 for img in all_images]
    assert sum(is_ramp) == 1


def test_a_changed_setting_builds_a_new_store_and_the_old_one_is_kept(hospital: Path) -> None:
    load_dicom_site(_cfg(hospital), progress=False)

    bigger = load_dicom_site(_cfg(hospital, image_size=32), progress=False)
    decoded_for_new = _report(_cfg(hospital))["decoded_now"]
    load_dicom_site(_cfg(hospital), progress=False)

    assert decoded_for_new == 40
    assert bigger.image_size == 32
    assert _report(_cfg(hospital))["decoded_now"] == 0
    assert len(list(_cfg(hospital).cache_path.glob("pixels-*"))) == 2


def test_changing_the_split_seed_moves_rows_without_decoding(hospital: Path) -> None:
    load_dicom_site(_cfg(hospital), progress=False)

    load_dicom_site(_cfg(hospital, split={"seed": 99}), progress=False)

    assert _report(_cfg(hospital))["decoded_now"] == 0


def test_parallel_build_equals_serial_build(tmp_path: Path) -> None:
    from fedrad import bundled_path
    from fedrad.client.dicom.convert import convert_npz_to_dicom

    # 80 files: above the size at which indexing and decoding use worker processes
    (root,) = convert_npz_to_dicom(bundled_path("data", "pneumoniamnist.npz"), tmp_path, num_hospitals=1,
                                   seed=11, max_images_per_hospital=80)
    salt = "same salt, same patient hashes, same splits"
    serial = load_dicom_site(_cfg(root, cache_dir=tmp_path / "serial", hash_salt=salt), progress=False)

    parallel = load_dicom_site(
        DicomDataConfig(
            root=root, labels_csv=Path("labels.csv"), workers=2, cache_dir=tmp_path / "parallel", hash_salt=salt
        ),
        progress=False,
    )

    np.testing.assert_array_equal(np.asarray(parallel.train.images), np.asarray(serial.train.images))
    np.testing.assert_array_equal(parallel.train.labels, serial.train.labels)


def test_a_damaged_cache_is_rebuilt_not_fatal(hospital: Path) -> None:
    cfg = _cfg(hospital)
    load_dicom_site(cfg, progress=False)
    store = next(cfg.cache_path.glob("pixels-*"))
    (store / "images.npy").write_bytes(b"garbage")

    site = load_dicom_site(cfg, progress=False)

    assert _report(cfg)["decoded_now"] == 40
    assert len(site.train) + len(site.val) + len(site.test) == 40


def test_pixels_changed_with_size_and_mtime_preserved_are_decoded_again(hospital: Path) -> None:
    """The cache is right by content: an in-place edit that keeps size and mtime is still seen."""
    cfg = _cfg(hospital)
    first = load_dicom_site(cfg, progress=False)
    rel = next(
        r.path for r in build_index(cfg, progress=False).records
        if r.transfer_syntax == "1.2.840.10008.1.2.1"  # uncompressed: pixels can be edited in place
    )
    path = hospital / rel
    st = path.stat()
    ds = pydicom.dcmread(path)
    data = bytearray(path.read_bytes())
    offset = len(data) - len(ds.PixelData)  # the pixel data is the last element
    ramp = np.tile(np.linspace(0, 4095, ds.Columns), (ds.Rows, 1))
    data[offset:] = np.rint(ramp).astype("<u2").tobytes()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    second = load_dicom_site(cfg, progress=False)

    assert _report(cfg)["decoded_now"] == 1 and _report(cfg)["reused_from_cache"] == 39
    before = np.concatenate([first.train.images, first.val.images, first.test.images])
    after = np.concatenate([second.train.images, second.val.images, second.test.images])
    changed = [i for i in range(40) if not any(np.array_equal(after[i], b) for b in before)]
    assert len(changed) == 1
    img = after[changed[0]][0]
    assert np.all(np.diff(img, axis=1) >= -1e-6) or np.all(np.diff(img, axis=1) <= 1e-6)  # the ramp (or inverted)


def test_decoder_refuses_content_that_changed_after_indexing(hospital: Path) -> None:
    from fedrad.client.dicom.decode import CHANGED, Preprocess, decode_file

    cfg = _cfg(hospital)
    record = build_index(cfg, progress=False).records[0]
    path = hospital / record.path
    assert decode_file(path, Preprocess(), expected_sha256=record.sha256).reason is None
    path.write_bytes(path.read_bytes() + b"\x00\x00")

    result = decode_file(path, Preprocess(), expected_sha256=record.sha256)

    assert result.image is None and result.reason == CHANGED
