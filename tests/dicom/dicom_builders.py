"""Build broken and unusual DICOM files programmatically (imported by plain name, like dicom_testutil)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from dicom_testutil import pydicom_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

#: SOP Classes of objects that are not images, with pydicom's names for them.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration Storage",
}


def ct() -> Dataset:
    """CT_small (128x128, 16-bit signed, rescale slope/intercept, no window), pixels loaded."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = bytes(ds.PixelData)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def with_empty_modality_lut_item(ds: Dataset) -> Dataset:
    ds.ModalityLUTSequence = Sequence([Dataset()])
    return ds


def with_window(ds: Dataset, center: float, width: float) -> Dataset:
    ds.WindowCenter, ds.WindowWidth = center, width
    return ds


def with_empty_voi_lut_item(ds: Dataset) -> Dataset:
    ds.VOILUTSequence = Sequence([Dataset()])
    return ds


def with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    ds.PixelData = pixels.astype("<i2" if int(ds.PixelRepresentation) else "<u2").tobytes()
    return ds


def as_sop_class(ds: Dataset, uid: str) -> Dataset:
    ds.SOPClassUID = uid
    ds.file_meta.MediaStorageSOPClassUID = uid
    return ds


def deflated(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def big_endian_palette() -> tuple[Dataset, Dataset]:
    """(little-endian examples_palette.dcm, the same image re-encoded Explicit VR Big Endian)."""
    little = pydicom.dcmread(pydicom_file("examples_palette.dcm"))
    big = pydicom.dcmread(pydicom_file("examples_palette.dcm"))
    assert int(big.BitsAllocated) == 8
    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableData"
        data = bytes(getattr(big, keyword))
        setattr(big, keyword, np.frombuffer(data, dtype="<u2").astype(">u2").tobytes())
    if big["PixelData"].VR == "OW":  # 8-bit samples in 16-bit words: each word's bytes swap too
        data = bytes(big.PixelData)
        big.PixelData = np.frombuffer(data, dtype="<u2").astype(">u2").tobytes()
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    return little, big


def save_big_endian(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` Explicit VR Big Endian (OW/OB values are written as they are held)."""
    from pydicom.filewriter import dcmwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return path


def with_inverting_voi_lut(ds: Dataset, *, first: int, entries: int, bits: int = 12) -> Dataset:
    """A VOI LUT Sequence item mapping [first, first + entries) to a decreasing ramp (an inverted image)."""
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    ramp = np.linspace(2**bits - 1, 0, entries).round().astype("<u2")
    item.LUTData = ramp.tolist()
    ds.VOILUTSequence = Sequence([item])
    return ds
