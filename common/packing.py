"""A model's arrays as one array on the wire: a transport encoding, lossless, both ways.

Flower moves every array of an ``ArrayRecord`` as its own object (plus 5 MiB chunks of the large
ones): ResNet-18-GN's 62 arrays make about 130 objects per message, and in deployment each object
costs an HTTP request through the Fleet gateway and the SuperLink (node authentication, the run's
status, SQLite bookkeeping, TLS twice). Packed, the same 44.7 MB is one array of ~10 chunks.

The packed form is a single 1-D array under :data:`PACKED_KEY`: the arrays raveled and concatenated
in the order of their sorted names. It carries no names, shapes or dtypes: the receiver unpacks it
against the model it already knows (a node: the model it built from the study; the coordinator:
the shapes and dtype it expects of a reply), and refuses anything whose dtype or length does not
match exactly, before decoding the payload. Packing changes no value (tests: bitwise round trip),
so what a node checked before packing (``check_reply``) is exactly what it sends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from .errors import ProtocolError

#: The one key of a packed ArrayRecord.
PACKED_KEY = "fedrad-packed"
#: Bytes the ``.npy`` header of a 1-D array may add to its payload (checked before decoding).
_NPY_HEADER_SLACK = 4096


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` holds a packed model (an ArrayRecord of one array under :data:`PACKED_KEY`)."""
    return isinstance(record, ArrayRecord) and list(record.keys()) == [PACKED_KEY]


def pack_arrays(record: ArrayRecord) -> ArrayRecord | None:
    """``record``'s arrays as one packed array; None when they do not share one dtype (or there
    are fewer than two: nothing to gain), in which case the record travels as it is."""
    if len(record) < 2 or PACKED_KEY in record:
        return None
    values = {name: record[name].numpy() for name in sorted(record.keys())}
    dtypes = {v.dtype for v in values.values()}
    if len(dtypes) != 1:
        return None
    flat = np.concatenate([v.reshape(-1) for v in values.values()])
    return ArrayRecord({PACKED_KEY: Array(flat)})


#: A receiver's dtype: one for every array, or per array name (which must then all agree).
DType = str | np.dtype | Mapping[str, str | np.dtype]


def as_unpacked(record: ArrayRecord, *, shapes: Mapping[str, tuple[int, ...]], dtype: DType,
                what: str) -> ArrayRecord:
    """``record`` itself, or its arrays when it is packed (:func:`unpack_arrays`)."""
    return unpack_arrays(record, shapes=shapes, dtype=dtype, what=what) if is_packed(record) else record


def unpack_arrays(record: ArrayRecord, *, shapes: Mapping[str, tuple[int, ...]], dtype: DType,
                  what: str) -> ArrayRecord:
    """The arrays of a packed ``record``, named and shaped by ``shapes`` (sorted by name), each of
    ``dtype`` (per name: all alike, else nothing was packed); raises :class:`ProtocolError` naming
    ``what`` unless the packed array is 1-D of exactly that dtype and total length (checked on its
    metadata before the payload is decoded). Whatever the sender put there, nothing else is raised."""
    if isinstance(dtype, Mapping):
        kinds = {np.dtype(dtype[name]) for name in shapes}
        if len(kinds) != 1:
            raise ProtocolError(f"{what}: a packed model for arrays of {len(kinds)} dtypes")
        dtype = kinds.pop()
    try:
        return _unpack(record, shapes=shapes, dtype=np.dtype(dtype), what=what)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed payload is the sender's, refused by name
        raise ProtocolError(f"{what}: packed arrays unusable ({type(exc).__name__})") from None


def _unpack(record: ArrayRecord, *, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype,
            what: str) -> ArrayRecord:
    if not is_packed(record):
        raise ProtocolError(f"{what}: not a packed model (one array {PACKED_KEY!r})")
    arr = record[PACKED_KEY]
    if not isinstance(arr, Array) or arr.stype != SType.NUMPY:
        raise ProtocolError(f"{what}: packed model is not a NumPy array")
    want_dtype = dtype
    sizes = {name: math.prod(shapes[name]) for name in sorted(shapes)}
    total = sum(sizes.values())
    if str(arr.dtype) != str(want_dtype) or tuple(arr.shape) != (total,):
        raise ProtocolError(f"{what}: packed model is {arr.dtype}{tuple(arr.shape)}, expected {want_dtype}({total},)")
    if len(arr.data) > want_dtype.itemsize * total + _NPY_HEADER_SLACK:
        raise ProtocolError(f"{what}: packed model holds {len(arr.data)} bytes for {want_dtype.itemsize * total}")
    try:
        flat = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's malformed payload
        raise ProtocolError(f"{what}: packed model does not decode ({type(exc).__name__})") from None
    if not isinstance(flat, np.ndarray):  # e.g. an .npz archive behind .npy metadata
        raise ProtocolError(f"{what}: packed model does not decode to an array")
    if flat.dtype != want_dtype or flat.shape != (total,):
        raise ProtocolError(f"{what}: packed payload is {flat.dtype}{flat.shape}, expected {want_dtype}({total},)")
    out: dict[str, Array] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = Array(np.ascontiguousarray(flat[start:start + size]).reshape(shapes[name]))
        start += size
    return ArrayRecord({name: out[name] for name in shapes})  # type: ignore[arg-type]
