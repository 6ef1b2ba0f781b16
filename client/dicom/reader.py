"""Reading DICOM files: with or without the 128-byte preamble, headers only or whole.

Files without a preamble/``DICM`` prefix (old exports) are read with ``force=True`` and only
accepted when they look like an image object (an SOP Class UID or a Pixel Data element),
so that stray non-DICOM files (spreadsheets, READMEs) are recognised as such.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

#: (group, element) of Pixel Data, Float Pixel Data and Double Float Pixel Data.
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
#: Media Storage Directory Storage (a DICOMDIR).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


class NotDicomError(Exception):
    """The bytes are not a DICOM data set."""


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns (and logs) about many harmless oddities; what matters is reported as skip reasons."""
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addFilter(_below_error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.removeFilter(_below_error)


def read_header(data: bytes) -> tuple[Dataset, bool]:
    """Parse everything before the pixel data; returns the dataset and whether pixel data follows."""
    bio = io.BytesIO(data)
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(bio, stop_before_pixels=True)
        except InvalidDicomError:
            bio.seek(0)
            try:
                ds = pydicom.dcmread(bio, stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - garbage in a forced read
                raise NotDicomError from None
            forced = True
        else:
            forced = False
    has_pixels = _pixel_tag_at(data, bio.tell(), ds)
    if forced and not (has_pixels or "SOPClassUID" in ds):
        raise NotDicomError
    return ds, has_pixels


def read_full(path: str) -> Dataset:
    """Read a whole file (raises :class:`NotDicomError` for non-DICOM content)."""
    with quiet_pydicom():
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:
            pass
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001
            raise NotDicomError from None
    if "SOPClassUID" not in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotDicomError
    return ds


def _pixel_tag_at(data: bytes, pos: int, ds: Dataset) -> bool:
    if pos + 4 > len(data):
        return False
    little = getattr(ds, "original_encoding", (None, True))[1]
    group, elem = struct.unpack("<HH" if little is not False else ">HH", data[pos : pos + 4])
    return (group, elem) in _PIXEL_TAGS
