"""Which DICOM objects are images a classifier may train on, decided by SOP Class.

Segmentations, RT dose grids and structure sets, presentation states, structured reports,
key object selections, parametric maps, registrations, waveforms, spectroscopy, encapsulated
documents and the like can carry Pixel Data or look like images but are not pictures of a
patient: they are skipped with the reason ``not an image object (<SOP class name>)``. An
unknown SOP Class is treated as an image (the later quality gate still applies). Without a
SOP Class, the Modality of a non-image object (SEG, RTDOSE, ...) decides.
"""

from __future__ import annotations

import re

from pydicom.uid import UID

NOT_AN_IMAGE = "not an image object"

#: SOP Class UIDs (or UID prefixes ending in ".") of objects that are not images.
_NON_IMAGE_UIDS = (
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data (exact) and 66.x: registration, fiducials, segmentation...
    "1.2.840.10008.5.1.4.1.1.66.",
    "1.2.840.10008.5.1.4.1.1.67",  # Real World Value Mapping
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio, ...)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL, OBJ, MTL
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.6",  # RT Brachy Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.7",  # RT Treatment Summary Record
    "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.9",  # RT Ion Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.",  # later RT objects (481.1 RT Image is allowed below)
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.200.",  # CT defined procedure protocols etc.
    "1.2.840.10008.5.1.4.1.1.68.",  # surface scan mesh / point cloud
    "1.2.840.10008.5.1.4.1.1.78.",  # lensometry, refractive, ... measurements
    "1.2.840.10008.5.1.4.1.1.79.",  # macular grid thickness and volume report
    "1.2.840.10008.5.1.4.1.1.80.",  # ophthalmic visual field
    "1.2.840.10008.5.1.4.1.1.82.",  # ophthalmic axial measurements, IOL calculation
    "1.2.840.10008.5.1.4.1.1.90.",  # content assessment results
    "1.2.840.10008.5.1.4.38.",  # hanging protocols
    "1.2.840.10008.5.1.4.39.",  # color palettes
    "1.2.840.10008.5.1.4.43.",  # generic implant templates
    "1.2.840.10008.5.1.4.44.",  # implant assembly templates
    "1.2.840.10008.5.1.4.45.",  # implant template groups
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
)
#: SOP Classes that share a prefix above but are images.
_IMAGE_EXCEPTIONS = ("1.2.840.10008.5.1.4.1.1.481.1",)  # RT Image
#: Modalities of non-image objects, used when there is no SOP Class UID.
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "SR", "KO", "REG", "FID", "RWV",
     "ECG", "HD", "AU", "DOC", "PLAN", "M3D", "RESP", "EPS", "BI", "HC"}
)
_NAME = re.compile(r"[^A-Za-z0-9 .,()/+-]")


def _is_non_image_uid(uid: str) -> bool:
    if uid in _IMAGE_EXCEPTIONS:
        return False
    return any(uid.startswith(p) if p.endswith(".") else uid == p for p in _NON_IMAGE_UIDS)


def sop_class_name(uid: str) -> str:
    """pydicom's name for a SOP Class UID (the UID itself when unknown); safe to report."""
    try:
        u = UID(uid)
        name = u.name if u.is_valid else ""
    except Exception:  # noqa: BLE001 - malformed UIDs in headers
        name = ""
    return _NAME.sub("", name or uid)[:80]


def non_image_reason(sop_class_uid: str, modality: str = "") -> str | None:
    """``not an image object (<name>)`` for objects that are not images, else None."""
    uid = sop_class_uid.strip().rstrip("\x00")
    if uid:
        if _is_non_image_uid(uid):
            return f"{NOT_AN_IMAGE} ({sop_class_name(uid)})"
        return None
    mod = modality.strip().upper()
    if mod in NON_IMAGE_MODALITIES:
        return f"{NOT_AN_IMAGE} (modality {mod})"
    return None


def is_image_sop_class(sop_class_uid: str) -> bool:
    """True for SOP Classes whose name says they store images (e.g. ``CT Image Storage``)."""
    name = sop_class_name(sop_class_uid)
    return "Image Storage" in name or "Secondary Capture" in name
