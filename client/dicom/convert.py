"""Write a labelled image set as per-hospital DICOM folders (demos, tests, benchmarks).

Each hospital folder (``hospital-1``, ``hospital-2``, ...) holds studies of several synthetic
patients (``images_per_patient`` images each, drawn uniformly in the closed range), with
realistic headers: CR or DX, 12-bit stored values (16 allocated) with a rescale slope and
intercept, a VOI window spanning the stored range (so decoding gives back the source image up to
12-bit quantisation), about a quarter MONOCHROME1 (stored inverted), some files with and some
without a ``.dcm`` suffix, optionally some RLE Lossless, plus a ``labels.csv`` with columns
``path`` (relative), ``sop_instance_uid`` and ``label`` (class name).

Everything is deterministic in ``seed``: identifiers come from a seeded generator and UIDs from
``pydicom.uid.generate_uid`` with fixed entropy sources. All identifiers are synthetic.
RGB sources (N, H, W, 3) are written as 8-bit RGB secondary captures.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from fedrad.common.errors import DataError

log = logging.getLogger(__name__)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PNEUMONIAMNIST_CLASSES = ("normal", "pneumonia")


def convert_npz_to_dicom(
    npz_path: str | Path,
    out_root: str | Path,
    *,
    num_hospitals: int,
    images_per_patient: tuple[int, int] = (1, 4),
    seed: int = 0,
    max_images_per_hospital: int | None = None,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    rle_fraction: float = 0.0,
) -> list[Path]:
    """Convert a MedMNIST-style ``.npz`` (uint8 images) into ``num_hospitals`` DICOM folders.

    ``class_names`` default: PneumoniaMNIST's names for 2 classes, else ``class-<k>``.
    """
    p = Path(npz_path)
    try:
        with np.load(p) as archive:
            images = np.concatenate([archive[f"{s}_images"] for s in splits])
            labels = np.concatenate([np.asarray(archive[f"{s}_labels"]).reshape(-1) for s in splits])
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except KeyError as exc:
        raise DataError(f"{p}: missing array {exc}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz archive ({type(exc).__name__})") from None
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if class_names is None:
        class_names = PNEUMONIAMNIST_CLASSES if n_classes == 2 else tuple(f"class-{k}" for k in range(n_classes))
    return convert_arrays_to_dicom(
        images,
        labels.astype(np.int64),
        tuple(class_names),
        out_root,
        num_hospitals=num_hospitals,
        images_per_patient=images_per_patient,
        seed=seed,
        max_images_per_hospital=max_images_per_hospital,
        rle_fraction=rle_fraction,
    )


def convert_arrays_to_dicom(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out_root: str | Path,
    *,
    num_hospitals: int,
    images_per_patient: tuple[int, int] = (1, 4),
    seed: int = 0,
    max_images_per_hospital: int | None = None,
    rle_fraction: float = 0.0,
) -> list[Path]:
    """``images``: uint8 (N, H, W) or (N, H, W, 3), or float in [0, 1]; ``labels``: int (N,)."""
    lo, hi = images_per_patient
    if num_hospitals < 1 or not 1 <= lo <= hi:
        raise DataError(f"bad converter arguments: num_hospitals={num_hospitals}, images_per_patient={images_per_patient}")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"labels outside 0..{len(class_names) - 1}")
    unit = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else np.clip(images.astype(np.float64), 0, 1)
    rng = np.random.default_rng(seed)
    shares = np.array_split(rng.permutation(len(images)), num_hospitals)
    out = Path(out_root)
    folders = []
    for h, share in enumerate(shares, start=1):
        if max_images_per_hospital is not None:
            share = share[:max_images_per_hospital]
        folder = out / f"hospital-{h}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_hospital(folder, h, unit[share], labels[share], tuple(class_names), rng, (lo, hi), seed, rle_fraction)
        folders.append(folder)
    log.info("wrote %d images into %d hospital folders", sum(min(len(s), max_images_per_hospital or len(s)) for s in shares), len(folders))
    return folders


def _write_hospital(
    folder: Path,
    hospital: int,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    rng: np.random.Generator,
    per_patient: tuple[int, int],
    seed: int,
    rle_fraction: float,
) -> None:
    rows = []
    i = 0
    patient = 0
    while i < len(images):
        patient += 1
        count = int(rng.integers(per_patient[0], per_patient[1] + 1))
        pid = f"{rng.integers(10**7, 10**8)}"
        ident = _PatientIdent(
            patient_id=pid,
            name=f"SYNTH^H{hospital}P{patient:05d}",
            birth_date=f"{int(rng.integers(1940, 2020))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
            sex=str(rng.choice(["F", "M", "O"])),
            study_uid=generate_uid(entropy_srcs=[str(seed), str(hospital), pid, "study"]),
            accession=f"A{rng.integers(10**8, 10**9)}",
        )
        study_dir = f"S{rng.integers(10**6, 10**7)}"
        for j in range(count):
            if i >= len(images):
                break
            sop_uid = generate_uid(entropy_srcs=[str(seed), str(hospital), pid, str(j), "sop"])
            ds = _image_dataset(images[i], ident, sop_uid, j, rng, seed)
            if rng.random() < rle_fraction:
                ds.compress(RLELossless, generate_instance_uid=False)
            name = f"IM{j + 1:04d}" + (".dcm" if rng.random() < 0.5 else "")
            rel = f"{study_dir}/{name}"
            (folder / study_dir).mkdir(exist_ok=True)
            ds.save_as(folder / rel, enforce_file_format=True)
            rows.append({"path": rel, "sop_instance_uid": sop_uid, "label": class_names[int(labels[i])]})
            i += 1
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "sop_instance_uid", "label"])
        writer.writeheader()
        writer.writerows(rows)


class _PatientIdent:
    def __init__(self, *, patient_id: str, name: str, birth_date: str, sex: str, study_uid: str, accession: str) -> None:
        self.patient_id, self.name, self.birth_date, self.sex = patient_id, name, birth_date, sex
        self.study_uid, self.accession = study_uid, accession


def _image_dataset(
    img: np.ndarray, who: _PatientIdent, sop_uid: str, number: int, rng: np.random.Generator, seed: int
) -> Dataset:
    rgb = img.ndim == 3
    modality = "OT" if rgb else str(rng.choice(["CR", "DX"]))
    sop_class = SC_STORAGE if rgb else (CR_STORAGE if modality == "CR" else DX_STORAGE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = who.patient_id
    ds.PatientName = who.name
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = who.sex
    ds.StudyInstanceUID = who.study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), sop_uid, "series"])
    ds.AccessionNumber = who.accession
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Modality = modality
    ds.SeriesNumber = number + 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.rint(img * 255).astype(np.uint8).tobytes()
        return ds
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    mono1 = bool(rng.random() < 0.25)
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    stored = np.rint(img * 4095).astype(np.uint16)
    if mono1:
        stored = (4095 - stored).astype(np.uint16)
    slope = float(rng.choice([0.5, 1.0, 2.0]))
    intercept = float(rng.choice([0.0, -1024.0, 100.0]))
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    low, high = intercept, intercept + slope * 4095
    # LINEAR window that maps [low, high] exactly onto the output range (PS3.3 C.11.2.1.2.1).
    ds.WindowCenter = f"{(low + high) / 2 + 0.5:g}"
    ds.WindowWidth = f"{high - low + 1:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds
