"""A hospital node's own DICOM archive: index, decode, preprocess, cache, patient-level splits.

Modules (one job each): :mod:`.config` (settings), :mod:`.walk` (an archive walk no entry can
abort), :mod:`.index` (hashes + headers + labels), :mod:`.reader` (headers, truncation),
:mod:`.sop` (which objects are images), :mod:`.phi` (attributes that may not be labels),
:mod:`.decode` (pixels -> preprocessed image), :mod:`.quality` (the gate after preprocessing),
:mod:`.chatter` (pydicom's and the decoders' output kept off the terminal), :mod:`.transfer`
(decoder registry), :mod:`.cache` (on-disk preprocessed cache), :mod:`.splits` (patient-level splits),
:mod:`.dataset` (``load_dicom_site``: the entry point), :mod:`.preview` (contact sheet),
:mod:`.convert` (labelled images -> synthetic hospital DICOM folders), :mod:`.cli`.

Heavy modules are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DicomDataConfig, SplitConfig, Window, load_dicom_config, parse_dicom_config

if TYPE_CHECKING:
    from .convert import convert_npz_to_dicom
    from .dataset import load_dicom_site, load_simulated_site
    from .index import build_index
    from .preview import write_preview

__all__ = [
    "DicomDataConfig",
    "SplitConfig",
    "Window",
    "build_index",
    "convert_npz_to_dicom",
    "load_dicom_config",
    "load_dicom_site",
    "load_simulated_site",
    "parse_dicom_config",
    "write_preview",
]

_LAZY = {
    "build_index": ".index",
    "convert_npz_to_dicom": ".convert",
    "load_dicom_site": ".dataset",
    "load_simulated_site": ".dataset",
    "write_preview": ".preview",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
