"""Security review finding 11: the coordinator never decodes a reply's array before checking what it
says about itself. ``np.load`` allocates whatever shape the ``.npy`` header states, so a few hundred
bytes claiming a (10**6, 10**6) float32 array made the coordinator try to allocate 4 TB (or, for a
merely large claim, hold it in memory) before the shape check ran.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedrad.server import screening
from fedrad.server.screening import MAX_NPY_HEADER, RejectedReply, screen_train

SHAPES = {"w": (4, 3), "b": (3,)}
METRICS = MetricRecord({"num-examples": 10, "round": 1, "steps": 1})


def _npy(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def _crafted_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A ``.npy`` header claiming ``shape``, followed by (almost) no data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 48


def _reply(**arrays: Array) -> RecordDict:
    good = {"w": Array(np.ones((4, 3), np.float32)), "b": Array(np.zeros(3, np.float32))}
    return RecordDict({"arrays": ArrayRecord({**good, **arrays}), "metrics": METRICS})


def _no_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every decode (``Array.numpy``) the screening does."""
    decoded: list[str] = []
    real = Array.numpy

    def numpy(self: Array) -> np.ndarray:
        decoded.append(str(self.shape))
        return real(self)

    monkeypatch.setattr(Array, "numpy", numpy)
    return decoded


def test_a_well_formed_reply_is_decoded() -> None:
    out = screen_train(_reply(), expected_shapes=SHAPES)
    assert out.arrays["w"].shape == (4, 3) and out.arrays["w"].dtype == np.float32


@pytest.mark.parametrize("case,array,words", [
    ("header claims a huge shape", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                                         data=_crafted_header((10**6, 10**6))), "header says"),
    ("header claims a huge shape, short data", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                                                     data=_crafted_header((10**6, 10**6))[:40]), "bytes"),
    ("header disagrees with the metadata", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                                                 data=_npy(np.ones(12, np.float32))), "header says"),
    ("header dtype differs", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                                   data=_npy(np.ones((4, 3), np.int32))), "header says"),
    ("declared shape differs", Array(np.ones((3, 4), np.float32)), "shape"),
    ("declared dtype differs", Array(np.ones((4, 3), np.float64)), "dtype"),
    ("not numpy serialisation", Array(dtype="float32", shape=(4, 3), stype="torch.raw", data=b"\0" * 48), "serial"),
    ("data far larger than the model", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                                             data=_npy(np.ones((4, 3), np.float32)) + b"\0" * (MAX_NPY_HEADER + 1)),
     "bytes"),
    ("truncated data", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                             data=_npy(np.ones((4, 3), np.float32))[:-4]), "bytes of data"),
    ("not an npy file", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=b"x" * 200),
     "unreadable array header"),
])
def test_arrays_are_checked_before_they_are_decoded(case: str, array: Array, words: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _no_decode(monkeypatch)

    with pytest.raises(RejectedReply, match=words) as exc:
        screen_train(_reply(w=array), expected_shapes=SHAPES)

    assert exc.value.field == "arrays.w"
    assert "(4, 3)" not in decoded  # the poisoned array was never handed to np.load


def test_header_check_reads_only_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header of the model's shape and dtype, with exactly the model's byte count, is decoded."""
    decoded = _no_decode(monkeypatch)
    data = _npy(np.full((4, 3), 2.0, np.float32))
    screening._check_encoding("arrays.w", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=data),
                              shape=(4, 3), dtype=np.dtype("float32"))
    assert decoded == []
    out = screen_train(_reply(w=Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=data)),
                       expected_shapes=SHAPES)
    assert float(out.arrays["w"].sum()) == 24.0
