"""Transfer-syntax registry: which syntaxes this node can decode, and why not when it cannot.

pydicom 3 picks a pixel-data decoder per transfer syntax; each decoder has plugins (numpy for
native syntaxes, pylibjpeg / pylibjpeg-libjpeg / pylibjpeg-openjpeg / pylibjpeg-rle,
python-gdcm, pyjpegls, Pillow). A syntax is *supported* when a decoder exists for it and at
least one of its plugins is installed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.pixels import get_decoder
from pydicom.uid import UID

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SyntaxSupport:
    uid: str
    name: str
    supported: bool
    plugins: tuple[str, ...]
    #: Why it is not supported ("" when it is).
    reason: str


@functools.lru_cache(maxsize=None)
def syntax_support(uid: str) -> SyntaxSupport:
    u = UID(uid)
    name = u.name if u.is_valid else uid
    try:
        decoder = get_decoder(u)
    except NotImplementedError:
        return SyntaxSupport(uid, name, False, (), f"unsupported transfer syntax {uid}")
    if not decoder.is_available:
        return SyntaxSupport(uid, name, False, (), f"no decoder installed for transfer syntax {uid}")
    return SyntaxSupport(uid, name, True, tuple(decoder.available_plugins), "")


def unsupported_reason(uid: str) -> str | None:
    """None when ``uid`` can be decoded here, else the skip reason."""
    s = syntax_support(uid)
    return None if s.supported else s.reason


def known_syntaxes() -> list[SyntaxSupport]:
    """Support status of every transfer syntax pydicom knows a pixel decoder for."""
    import pydicom.uid as uids

    return [syntax_support(str(u)) for u in uids.AllTransferSyntaxes]


def transfer_syntax_of(ds: "Dataset") -> str:
    """The dataset's transfer syntax; for files without one, inferred from how pydicom read it.

    Sets ``ds.file_meta.TransferSyntaxUID`` when it was inferred, so that pydicom's decoders work.
    Returns "" when unknown.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if tsyntax:
        return tsyntax
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return ""
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return str(uid)
