"""Reading DICOM files: with or without the 128-byte preamble, headers only or whole.

Files without a preamble/``DICM`` prefix (old exports) are read with ``force=True`` and only
accepted when they look like an image object (an SOP Class UID or a Pixel Data element),
so that stray non-DICOM files (spreadsheets, READMEs) are recognised as such.

pydicom reads a file cut short inside its header without complaint (the last value is just
short); :func:`read_header` notices (a value shorter than its declared length, a file meta
group longer than the file, nothing after the file meta) and says ``truncated``.
Deflated files (1.2.840.10008.1.2.1.99) are inflated by pydicom, so whether they hold pixel
data is read from the inflated data set, not from the compressed bytes.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .chatter import quiet_pydicom

log = logging.getLogger(__name__)

#: (group, element) of Pixel Data, Float Pixel Data and Double Float Pixel Data.
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Media Storage Directory Storage (a DICOMDIR).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF

__all__ = ["DICOMDIR_SOP_CLASS", "HeaderRead", "NotDicomError", "quiet_pydicom", "read_full", "read_header"]


class NotDicomError(Exception):
    """The bytes are not a DICOM data set."""


@dataclass(frozen=True)
class HeaderRead:
    ds: Dataset
    has_pixels: bool
    #: The file ends inside its header (a value or the file meta is cut short).
    truncated: bool
    #: Reading stopped at the end of the file (no pixel data followed).
    at_eof: bool


def read_header(data: bytes) -> HeaderRead:
    """Parse everything before the pixel data of the file held in ``data``."""
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
        stop = bio.tell()
        tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if tsyntax == DEFLATED:
            full = pydicom.dcmread(io.BytesIO(data))
            has_pixels = any(k in full for k in PIXEL_KEYWORDS)
            at_eof = not has_pixels
        else:
            has_pixels = _pixel_tag_at(data, stop, ds)
            at_eof = stop >= len(data)
    if forced and not (has_pixels or "SOPClassUID" in ds):
        raise NotDicomError
    truncated = not has_pixels and (_meta_cut_short(data, ds) or _last_value_cut_short(ds) or _empty_after_meta(data, ds))
    return HeaderRead(ds, has_pixels, truncated, at_eof)


def read_full(source: str | bytes) -> Dataset:
    """Read a whole file (a path, or its bytes); raises :class:`NotDicomError` for non-DICOM content."""
    def stream() -> io.BytesIO | str:
        return io.BytesIO(source) if isinstance(source, bytes) else source

    with quiet_pydicom():
        try:
            return pydicom.dcmread(stream())
        except InvalidDicomError:
            pass
        try:
            ds = pydicom.dcmread(stream(), force=True)
        except Exception:  # noqa: BLE001
            raise NotDicomError from None
    if "SOPClassUID" not in ds and not any(k in ds for k in PIXEL_KEYWORDS):
        raise NotDicomError
    return ds


def _pixel_tag_at(data: bytes, pos: int, ds: Dataset) -> bool:
    if pos + 4 > len(data):
        return False
    little = getattr(ds, "original_encoding", (None, True))[1]
    group, elem = struct.unpack("<HH" if little is not False else ">HH", data[pos : pos + 4])
    return (group, elem) in _PIXEL_TAGS


def _has_prefix(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _meta_cut_short(data: bytes, ds: Dataset) -> bool:
    """The file meta group length says the group runs past the end of the file."""
    if not _has_prefix(data):
        return False
    if len(data) < 144:
        return True
    meta = getattr(ds, "file_meta", None)
    length = getattr(meta, "FileMetaInformationGroupLength", None) if meta is not None else None
    if length is None:
        return False
    try:
        return 144 + int(length) > len(data)
    except (TypeError, ValueError):
        return False


def _empty_after_meta(data: bytes, ds: Dataset) -> bool:
    """A DICOM file (``DICM`` prefix) whose data set holds nothing at all."""
    return _has_prefix(data) and len(ds) == 0


def _last_value_cut_short(ds: Dataset) -> bool:
    """The last element read holds fewer bytes than its declared length."""
    try:
        tags = list(ds.keys())
        if not tags:
            return False
        raw = ds.get_item(tags[-1])
    except Exception:  # noqa: BLE001 - malformed elements: not our question here
        return False
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if length is None or length == _UNDEFINED or not isinstance(value, (bytes, type(None))):
        return False
    return len(value or b"") < int(length)
