"""The public corpus: pydicom's bundled test files and any test files the decoder plugins ship.

Indexed and decoded as one hospital would: zero crashes, every entry accounted for with a
reason, and every file that pydicom itself decodes is usable, unless the quality gate refuses
it for a reason this test checks independently (an object that is not an image, identical
content to a usable file, or an image with (almost) no contrast in pydicom's own pixels).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from fedrad.client.dicom import DicomDataConfig
from fedrad.client.dicom.cache import PixelCache
from fedrad.client.dicom.decode import Preprocess, frame_index
from fedrad.client.dicom.index import build_index
from fedrad.client.dicom.quality import CONSTANT, NEAR_CONSTANT

#: Decoder plugins whose installed packages may carry DICOM test files.
PLUGINS = ("pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls", "gdcm", "pylibjpeg_data", "ljdata")


def _plugin_dicom_files() -> list[Path]:
    found: list[Path] = []
    for name in PLUGINS:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin:
            continue
        base = Path(spec.origin).parent
        if base.name == "site-packages":  # a single-module plugin (gdcm.py): nothing to walk
            continue
        for p in base.rglob("*"):
            if p.is_file() and p.stat().st_size > 132 and (p.suffix.lower() == ".dcm" or _has_dicm(p)):
                found.append(p)
    return found


def _has_dicm(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pydicom's data folder (test files, palettes, charsets) and the plugins' files, copied."""
    root = tmp_path_factory.mktemp("corpus") / "archive"
    shutil.copytree(Path(pydicom.data.__file__).parent, root / "pydicom", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for k, path in enumerate(_plugin_dicom_files()):
        dst = root / "plugins" / f"{k:03d}-{path.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
    return root


def _pydicom_pixels(path: Path) -> np.ndarray | None:
    """The frame fedrad would use, as pydicom decodes it on its own (None when it cannot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            arr = ds.pixel_array
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either
            return None
    if frames > 1:
        arr = arr[frame_index(frames, "middle")]
    return arr


def _sop_name(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    uid = str(ds.get("SOPClassUID", "") or "")
    return UID(uid).name if uid else ""


def test_public_corpus_indexes_without_a_crash_and_loses_nothing_pydicom_decodes(
    corpus: Path, tmp_path: Path
) -> None:
    files = sorted(p for p in corpus.rglob("*") if p.is_file() or p.is_symlink())
    rels = [p.relative_to(corpus).as_posix() for p in files]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([rel, "ab"[k % 2]] for k, rel in enumerate(rels))
    cfg = DicomDataConfig(root=corpus, labels_csv=labels, class_names=("a", "b"), cache_dir=tmp_path / "cache",
                          image_size=28, workers=2)

    index = build_index(cfg, progress=False)  # must not raise
    cache = PixelCache(cfg.cache_path, Preprocess.from_config(cfg), cfg.preprocess_hash())
    with cache.locked():
        update = cache.update([(r.sha256, corpus / r.path) for r in index.records], workers=2, progress=False)

    s = index.summary()
    assert s["files_seen"] == len(files) == s["indexed"] + s["skipped"]
    assert all(sk.reason for sk in index.skipped)
    assert all(reason for reason, _ in update.failed.values())
    usable = {r.path for r in index.records if r.sha256 not in update.failed}
    usable_sha = {r.sha256 for r in index.records if r.path in usable}
    why = {sk.path: sk.reason for sk in index.skipped}
    why.update({r.path: update.failed[r.sha256][0] for r in index.records if r.sha256 in update.failed})
    lost = {}
    for path, rel in zip(files, rels):
        pixels = _pydicom_pixels(path)
        if pixels is None or rel in usable:
            continue
        reason = why[rel]
        if reason == "duplicate content":  # judged by the copy that was indexed
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if sha in usable_sha:
                continue
            reason = update.failed.get(sha, ("?", ""))[0]
        if reason.startswith("not an image object"):
            name = _sop_name(path)
            if "Image Storage" not in name:
                continue
        elif reason in (CONSTANT, NEAR_CONSTANT):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                depth = float(2 ** int(pydicom.dcmread(path, stop_before_pixels=True).get("BitsStored", 8)) - 1)
            per_channel = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
            if float(per_channel.std(axis=0).max()) / depth < 2.0 / 255.0:
                continue
        lost[rel] = reason
    assert lost == {}
    assert s["indexed"] >= 90 and len(usable) >= 85  # pydicom 3.0: 95 indexed, 88 usable
