"""Decode one DICOM file into a preprocessed float32 (C, H, W) image in [0, 1].

The pipeline, in order (each step is pydicom's own implementation where pydicom has one):

0. objects that are not images (by SOP Class, see :mod:`.sop`) are refused;
1. pixels of one frame via pydicom 3's decoder for the file's transfer syntax
   (multi-frame: ``frame_policy`` = ``middle`` -> frame ``n // 2``, ``first`` -> 0, ``last`` -> n-1;
   only that frame is decoded);
2. colour: ``YBR_FULL``/``YBR_FULL_422`` -> RGB with ``convert_color_space``; ``PALETTE COLOR`` ->
   RGB with ``apply_color_lut`` (big-endian LUT data is byte-swapped first: pydicom reads it
   little-endian); RGB as is, scaled by its bit depth;
3. greyscale: Modality LUT / rescale slope+intercept (``apply_modality_lut``), then VOI:
   the configured window, else the first window in the file (``apply_windowing``), else the
   file's VOI LUT (``apply_voi``), else clipping at the configured percentiles; then
   MONOCHROME1 is inverted so that 1 is always bright;
4. channels: grey -> repeated to 3 channels, or RGB -> luma (ITU-R BT.601) for 1 channel;
5. geometry: centred zero-padding to a square, then ``torch.nn.functional.interpolate``
   (bilinear, antialias) to ``image_size`` x ``image_size``; clamped to [0, 1];
6. the quality gate (:mod:`.quality`): constant or near-constant images are refused.

A bad header part never drops an image that pydicom can decode: an unusable Modality LUT is
ignored (rescale, else the stored values, are used), an unusable or out-of-data VOI window or
LUT is ignored (percentile windowing is used); each such fallback is a *note* on the result.

Problems with a file (not DICOM, truncated, no pixel data, no decoder, unsupported
photometric interpretation, a decoder error, not an image, constant) give a
:class:`DecodeResult` with a ``reason``; this module never raises for bad data. Reasons and
notes never contain identifiers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)

from .chatter import quiet
from .quality import gate_reason, is_flat
from .reader import PIXEL_KEYWORDS, NotDicomError, read_full
from .sop import non_image_reason
from .transfer import transfer_syntax_of, unsupported_reason

if TYPE_CHECKING:
    from .config import DicomDataConfig

log = logging.getLogger(__name__)

GREY = ("MONOCHROME1", "MONOCHROME2")
_LUMA = np.array([0.299, 0.587, 0.114])

# Skip/failure reasons (grouped by these strings in reports).
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable"
NO_PIXELS = "no pixel data"
DECODE_FAILED = "pixel decoding failed"
BAD_PHOTOMETRIC = "unsupported photometric interpretation"
BAD_VALUES = "no finite pixel values"
CHANGED = "file changed since it was indexed"

# Notes: the image is used, but part of its header was not.
NOTE_MODALITY_LUT = "unusable Modality LUT ignored"
NOTE_RESCALE = "unusable rescale slope/intercept ignored"
NOTE_WINDOW = "unusable VOI window ignored (percentile windowing used)"
NOTE_WINDOW_OUTSIDE = "VOI window outside the pixel values (percentile windowing used)"
NOTE_CONFIGURED_WINDOW_OUTSIDE = "configured window outside the pixel values (percentile windowing used)"
#: (A window "outside" the values leaves a constant or near-constant image, see :mod:`.quality`.)
NOTE_VOI_LUT = "unusable VOI LUT ignored (percentile windowing used)"
NOTE_VOI_LUT_FLAT = "VOI LUT flattens the image (percentile windowing used)"
NOTE_NONFINITE = "non-finite pixel values replaced by the minimum"


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing settings a worker needs (picklable, hashable)."""

    image_size: int = 28
    channels: int = 1
    window: tuple[float, float] | None = None
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    frame_policy: str = "middle"

    @classmethod
    def from_config(cls, cfg: "DicomDataConfig") -> "Preprocess":
        win = None if cfg.window is None else (cfg.window.center, cfg.window.width)
        return cls(cfg.image_size, cfg.channels, win, tuple(cfg.clip_percentiles), cfg.frame_policy)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DecodeResult:
    #: float32 (C, H, W) in [0, 1], or None when the file could not be used.
    image: np.ndarray | None
    #: Grouping reason when ``image`` is None (e.g. ``"no pixel data"``).
    reason: str | None = None
    #: Extra detail, safe to log (exception type, photometric interpretation, ...).
    detail: str = ""
    #: Fallbacks taken for a usable image (see module doc).
    notes: tuple[str, ...] = ()


def frame_index(num_frames: int, policy: str) -> int:
    """The frame a multi-frame image contributes (see module doc)."""
    if num_frames <= 1:
        return 0
    if policy == "first":
        return 0
    if policy == "last":
        return num_frames - 1
    return num_frames // 2


def decode_file(path: str | Path, settings: Preprocess, *, expected_sha256: str | None = None) -> DecodeResult:
    """Read, decode and preprocess ``path``; never raises for bad data.

    With ``expected_sha256`` the bytes decoded are the bytes hashed: a file whose content no
    longer has that hash gives the reason :data:`CHANGED` (so a cache keyed by content never
    stores the pixels of other content).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return DecodeResult(None, UNREADABLE, type(exc).__name__)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        return DecodeResult(None, CHANGED)
    try:
        ds = read_full(data)
    except NotDicomError:
        return DecodeResult(None, NOT_DICOM)
    except Exception as exc:  # noqa: BLE001 - any reader error means the file is unusable
        return DecodeResult(None, UNREADABLE, type(exc).__name__)
    return decode_dataset(ds, settings)


def decode_dataset(ds: Dataset, settings: Preprocess) -> DecodeResult:
    """Decode and preprocess an already-read dataset; never raises for bad data."""
    with quiet():
        try:
            return _decode_dataset(ds, settings)
        except Exception as exc:  # noqa: BLE001 - last line of defence for malformed headers
            return DecodeResult(None, DECODE_FAILED, type(exc).__name__)


def _decode_dataset(ds: Dataset, settings: Preprocess) -> DecodeResult:
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if (why := non_image_reason(sop_class, str(ds.get("Modality", "") or ""))) is not None:
        return DecodeResult(None, why)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        return DecodeResult(None, NO_PIXELS)
    tsyntax = transfer_syntax_of(ds)
    if not tsyntax:
        return DecodeResult(None, UNREADABLE, "no transfer syntax")
    if (why := unsupported_reason(tsyntax)) is not None:
        return DecodeResult(None, why)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = frame_index(frames, settings.frame_policy)
        arr, meta = get_decoder(tsyntax).as_array(ds, index=index, as_rgb=False)
    except Exception as exc:  # noqa: BLE001 - truncated data, decoder errors, bad headers
        return DecodeResult(None, DECODE_FAILED, type(exc).__name__)
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    notes: list[str] = []
    try:
        rgb_or_grey = _to_unit_range(arr, ds, photometric, settings, notes)
    except _Unsupported as exc:
        return DecodeResult(None, BAD_PHOTOMETRIC, str(exc))
    except Exception as exc:  # noqa: BLE001 - LUT/colour errors from malformed headers
        return DecodeResult(None, DECODE_FAILED, type(exc).__name__)
    if rgb_or_grey is None:
        return DecodeResult(None, BAD_VALUES)
    image = pad_and_resize(_to_channels(rgb_or_grey, settings.channels), settings.image_size)
    if (why := gate_reason(image)) is not None:
        return DecodeResult(None, why, notes=tuple(notes))
    return DecodeResult(image, notes=tuple(notes))


class _Unsupported(Exception):
    pass


def _to_unit_range(
    arr: np.ndarray, ds: Dataset, photometric: str, s: Preprocess, notes: list[str]
) -> np.ndarray | None:
    """(H, W) grey or (H, W, 3) RGB float64 in [0, 1]; None if no finite values."""
    if photometric in GREY:
        if arr.ndim != 2:
            raise _Unsupported(f"{photometric} with shape {arr.shape}")
        out = grey_to_unit(arr, ds, s, notes=notes)
        if out is None:
            return None
        return 1.0 - out if photometric == "MONOCHROME1" else out
    if photometric.startswith("YBR_FULL"):
        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, _palette_view(ds))
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return rgb.astype(np.float64) / float(2 ** (8 if rgb.dtype == np.uint8 else bits) - 1)
    if photometric in ("RGB", "YBR_ICT", "YBR_RCT") and arr.ndim == 3 and arr.shape[-1] == 3:
        if np.issubdtype(arr.dtype, np.floating):
            return _minmax(arr.astype(np.float64))
        bits = int(ds.get("BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)
    raise _Unsupported(photometric or "<missing>")


_PALETTE_DATA = tuple(
    f"{kind}{colour}PaletteColorLookupTableData" for kind in ("", "Segmented") for colour in ("Red", "Green", "Blue")
) + ("AlphaPaletteColorLookupTableData",)


def _palette_view(ds: Dataset) -> Dataset:
    """``ds`` itself, or for a big-endian file a shallow copy with the LUT data byte-swapped.

    pydicom's ``apply_color_lut`` reads OW LUT data in the machine's (little-endian) order;
    in a big-endian file those bytes are big-endian, so every colour came out near black.
    """
    little = getattr(ds, "original_encoding", (None, True))[1]
    if little is not False:
        return ds
    view = Dataset()
    for elem in ds:
        if elem.keyword not in _PALETTE_DATA and elem.keyword != "PixelData" and elem.VR != "SQ":
            view.add(elem)
    for keyword in _PALETTE_DATA:
        value = ds.get(keyword)
        if isinstance(value, (bytes, bytearray)) and len(value) % 2 == 0:
            setattr(view, keyword, np.frombuffer(bytes(value), dtype=">u2").astype("<u2").tobytes())
        elif value is not None:
            setattr(view, keyword, value)
    return view


def modality_values(arr: np.ndarray, ds: Dataset, notes: list[str] | None = None) -> np.ndarray:
    """Stored values -> modality values (pydicom), ignoring an unusable Modality LUT or rescale."""
    notes = notes if notes is not None else []
    try:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - empty LUT items, bad descriptors, non-numeric rescale
        log.debug("modality LUT unusable (%s)", type(exc).__name__)
    if ds.get("ModalityLUTSequence") is not None and "ModalityLUTSequence" in ds:
        notes.append(NOTE_MODALITY_LUT)
    try:
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            if np.isfinite(slope) and np.isfinite(intercept) and slope != 0.0:
                return arr.astype(np.float64) * slope + intercept
    except (TypeError, ValueError):
        pass
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        notes.append(NOTE_RESCALE)
    return arr.astype(np.float64)


def grey_to_unit(arr: np.ndarray, ds: Dataset, s: Preprocess, *, notes: list[str] | None = None) -> np.ndarray | None:
    """Modality LUT, then VOI (window / LUT / percentiles) -> float64 in [0, 1]; no inversion."""
    notes = notes if notes is not None else []
    values = modality_values(arr, ds, notes)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    if not finite.all():
        values = np.where(finite, values, np.min(values[finite]))
        notes.append(NOTE_NONFINITE)
    out = None
    if s.window is not None:
        out = _window(values, ds, s.window[0], s.window[1], "LINEAR")
        if out is None or _flattened(out, values, s):
            notes.append(NOTE_CONFIGURED_WINDOW_OUTSIDE)
            out = None
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds["WindowCenter"].value), _first(ds["WindowWidth"].value)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        out = None if center is None or width is None else _window(values, ds, center, width, function)
        if out is None:
            notes.append(NOTE_WINDOW)
        elif _flattened(out, values, s):
            notes.append(NOTE_WINDOW_OUTSIDE)
            out = None
        if out is None and ds.get("VOILUTSequence"):
            out = _voi_lut(values, ds, notes, s)
    elif ds.get("VOILUTSequence"):
        out = _voi_lut(values, ds, notes, s)
    if out is None:
        out = _percentile_clip(values, s.clip_percentiles)
    return out


def _flattened(windowed: np.ndarray, values: np.ndarray, s: Preprocess) -> bool:
    """The window (or LUT) leaves a constant or near-constant image where percentile windowing would not."""
    if gate_reason(windowed) is None or is_flat(values):
        return False
    return gate_reason(_percentile_clip(values, s.clip_percentiles)) is None


def _first(value: object) -> float | None:
    """First value of a DS element (VM 1 or more) as a finite float; None when unusable."""
    try:
        if not isinstance(value, (str, bytes, int, float)):
            value = value[0]  # type: ignore[index]  # MultiValue / list
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None
    return out if np.isfinite(out) else None


def _window(values: np.ndarray, ds: Dataset, center: float, width: float, function: str) -> np.ndarray | None:
    """pydicom's windowing of modality values, scaled to [0, 1].

    The values are already in modality units, so the view handed to pydicom carries no
    Modality LUT or rescale (a broken one cannot fail here); the output is normalised by the
    window function's own output range, which makes the result independent of that range.
    """
    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = int(ds.get("BitsStored", 16) or 16)
    view.PixelRepresentation = int(ds.get("PixelRepresentation", 0) or 0)
    view.WindowCenter = center
    view.WindowWidth = width
    view.VOILUTFunction = function.strip().upper() or "LINEAR"
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            lo, hi = apply_windowing(np.array([-1e300, 1e300]), view)
            out = apply_windowing(values, view)
    except (ValueError, TypeError, AttributeError) as exc:  # width < 1 for LINEAR, unknown function
        log.debug("ignoring unusable VOI window (%s)", type(exc).__name__)
        return None
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _voi_lut(values: np.ndarray, ds: Dataset, notes: list[str], s: Preprocess) -> np.ndarray | None:
    try:
        item = ds.VOILUTSequence[0]
        depth = int(item.LUTDescriptor[2])
        view = Dataset()
        view.VOILUTSequence = ds.VOILUTSequence
        view.PhotometricInterpretation = "MONOCHROME2"
        view.BitsStored = int(ds.get("BitsStored", 16) or 16)
        view.PixelRepresentation = int(ds.get("PixelRepresentation", 0) or 0)
        out = apply_voi(np.rint(values).astype(np.int64), view, index=0)
    except Exception as exc:  # noqa: BLE001 - malformed LUT: fall back to percentiles
        log.debug("ignoring unusable VOI LUT (%s)", type(exc).__name__)
        notes.append(NOTE_VOI_LUT)
        return None
    out = np.clip(out.astype(np.float64) / float(2**depth - 1), 0.0, 1.0)
    if _flattened(out, values, s):
        notes.append(NOTE_VOI_LUT_FLAT)
        return None
    return out


def _percentile_clip(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (C, H, W) float32."""
    if img.ndim == 2:
        chw = img[None]
        if channels == 3:
            chw = np.repeat(chw, 3, axis=0)
    else:
        chw = np.moveaxis(img, -1, 0)
        if channels == 1:
            chw = np.tensordot(_LUMA, chw, axes=1)[None]
    return np.ascontiguousarray(chw, dtype=np.float32)


def pad_and_resize(chw: np.ndarray, size: int) -> np.ndarray:
    """Centred zero-padding to a square, then antialiased bilinear resize; float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F

    c, h, w = chw.shape
    side = max(h, w)
    if h != w:
        square = np.zeros((c, side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[:, top : top + h, left : left + w] = chw
        chw = square
    if side != size:
        t = torch.from_numpy(np.ascontiguousarray(chw))[None]
        chw = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    return np.clip(chw, 0.0, 1.0).astype(np.float32, copy=False)
