"""The coordinator's value checks of every hospital reply before anything from it is used.

:func:`fedrad.common.protocol.check_reply` decides what a reply may *carry* (allow-lists, names,
shapes). This module decides whether the values are *usable*: a reply that fails here is left
out of the aggregation and the pooled validation, and the round goes on with the others
(issue 9, point 7: NaN/Inf weights gave a NaN global model; float16/int64 arrays passed;
``num-examples`` of 1e9 let one site dictate the model, -20 crashed the weighted mean).

Rules (train and evaluate replies):

- arrays (train): exactly the model's names; before anything is decoded, each array's serialisation
  type, declared dtype and shape, its ``.npy`` header's dtype and shape, and its byte length (the
  model's size plus a header of at most MAX_NPY_HEADER bytes) are checked (``np.load`` allocates
  whatever shape the header states); then it decodes as a NumPy array of the model's dtype
  (float32) and shape, every value finite. The aggregation only ever sees the decoded arrays.
- ``num-examples``: an integer in [1, MAX_EXAMPLES] for train, [0, MAX_EXAMPLES] for evaluate.
  MAX_EXAMPLES = 10**7 (ten million images: far above any one hospital's training set, small
  enough that a weighted mean over a handful of sites stays finite and no site's weight can exceed
  the others' by more than that factor). It bounds a lying site's weight; it cannot make a site
  honest (robust strategies such as ``fedmedian`` or ``fedtrimmedavg`` limit that further).
- every metric a finite number; counts (``round``, ``steps``, ``partition-id``) integers in range;
  privacy figures (epsilon, budgets, noise multiplier, clipping norm, delta, sample rate) >= 0,
  ``delta`` < 1 and ``sample_rate`` <= 1.
- ``histograms`` (evaluate): C * 2 * HIST_BINS integers in [-MAX_EXAMPLES, MAX_EXAMPLES] (noisy
  counts are signed, issue 10: the coordinator clips after pooling).
- an evaluation inside a train reply (``val-`` metrics, issue 14): the evaluate reply's checks on
  ``val-num-examples``, ``val-histograms``, ``val-round``, ``val-epsilon*``; or ``val-refused`` alone
  (a refusal code). Whether it is used at all is the coordinator's decision (it asked, or it ignores it).
- ``float16-delta`` updates (``federation.update_encoding``): every floating array float16 (exactly),
  finite, added in float32 to the coordinator's OWN copy of the global arrays it sent that round
  (never anything the node states); the sum must be finite too.
- ``receipt`` (optional ConfigRecord): exactly ``audit-head`` (64 lowercase hex characters) and
  ``audit-count`` (an integer >= 1).

Fields the current wire contract dropped (``train_loss``, ``val_loss``, ``auc``, ``confusion``...;
an older node still sends them) are ignored: never checked, never recorded.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy_format

from fedrad.common.errors import ProtocolError
from fedrad.common.metrics import HIST_BINS
from fedrad.common.protocol import update_dtype

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
RECEIPT_KEY = "receipt"

#: Largest ``num-examples`` (and histogram count) a reply may state; see the module docstring.
MAX_EXAMPLES = 10**7
#: Largest round count, step count and partition id a reply may state.
MAX_COUNT = 10**9

HEX64 = re.compile(r"[0-9a-f]{64}")

#: Contract metrics of a train reply and of an evaluate reply (besides ``num-examples``).
TRAIN_FIELDS = frozenset({"num-examples", "round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm",
                          "delta", "epsilon", "epsilon_budget", "study_epsilon", "study_epsilon_budget",
                          "partition-id"})
#: An evaluation inside a train reply: the evaluate reply's fields under ``val-``, or ``val-refused``.
TRAIN_EVAL_FIELDS = frozenset({"val-num-examples", "val-histograms", "val-round", "val-epsilon",
                               "val-epsilon_budget", "val-refused", "val-histogram-noise-std"})
#: Codes a refused evaluation may state (the node's fixed refusal codes).
REFUSAL_CODES = frozenset({4000, 4001, 4002, 4003})
EVAL_FIELDS = frozenset({"num-examples", "histograms", "round", "epsilon", "epsilon_budget", "partition-id",
                         "histogram-noise-std"})
#: Sent by nodes that predate the current contract; ignored (the allow-list refuses them once merged).
LEGACY_FIELDS = frozenset({"train_loss", "train_seconds", "val_loss", "auc", "accuracy", "sensitivity",
                           "specificity", "f1", "confusion"})

_INT_FIELDS = {"round": (1, MAX_COUNT), "steps": (0, MAX_COUNT), "partition-id": (0, MAX_COUNT)}
_NONNEG_FIELDS = frozenset({"noise_multiplier", "max_grad_norm", "epsilon", "epsilon_budget", "study_epsilon",
                            "study_epsilon_budget", "sample_rate", "delta", "histogram-noise-std"})
_UPPER = {"sample_rate": (1.0, True), "delta": (1.0, False),  # (bound, inclusive)
          "histogram-noise-std": (float(MAX_EXAMPLES), True)}


class RejectedReply(ProtocolError):
    """A reply whose values cannot be used; ``field`` names the offending part."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class Receipt:
    """A node's audit-log head right after it recorded the reply."""

    head: str
    count: int

    def as_dict(self) -> dict[str, Any]:
        return {"audit_head": self.head, "audit_count": self.count}


@dataclass(frozen=True)
class ScreenedReply:
    """What the coordinator may use of a reply: checked values only."""

    num_examples: int
    metrics: dict[str, int | float]  # contract scalars, legacy fields and num-examples left out
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # train
    histograms: np.ndarray | None = None  # evaluate: int64 (C, 2, HIST_BINS), signed
    receipt: Receipt | None = None
    #: train: the evaluation of the global model the node received, if the reply carries one
    #: (an evaluate-shaped :class:`ScreenedReply`), or the code of its refusal.
    evaluation: "ScreenedReply | None" = None
    evaluation_refused: int | None = None


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise RejectedReply(name, f"must be an integer, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise RejectedReply(name, f"{v} is outside [{lo}, {hi}]")
    return v


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RejectedReply(name, f"must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise RejectedReply(name, f"must be finite, got {v}")
    return v


def screen_receipt(record: Any) -> Receipt:
    """The receipt record: exactly ``audit-head`` (64 lowercase hex) and ``audit-count`` (int >= 1)."""
    if not isinstance(record, ConfigRecord):
        raise RejectedReply(RECEIPT_KEY, f"must be a ConfigRecord, got {type(record).__name__}")
    keys = set(record.keys())
    if keys != {"audit-head", "audit-count"}:
        raise RejectedReply(RECEIPT_KEY, f"must hold exactly ['audit-count', 'audit-head'], got {sorted(keys)}")
    head = record["audit-head"]
    if not isinstance(head, str) or not HEX64.fullmatch(head):
        raise RejectedReply(f"{RECEIPT_KEY}.audit-head", "must be 64 lowercase hexadecimal characters")
    count = record["audit-count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RejectedReply(f"{RECEIPT_KEY}.audit-count", f"must be an integer >= 1, got {count!r}")
    return Receipt(head=head, count=int(count))


def _records(content: RecordDict, *, kind: str, want: set[str]) -> Receipt | None:
    names = set(content.keys())
    receipt = None
    if RECEIPT_KEY in names:
        receipt = screen_receipt(content[RECEIPT_KEY])
        names.discard(RECEIPT_KEY)
    if names != want:
        raise RejectedReply("records", f"a {kind} reply holds {sorted(want)} (and optionally "
                                       f"'{RECEIPT_KEY}'), got {sorted(content.keys())}")
    if not isinstance(content[METRICS_KEY], MetricRecord):
        raise RejectedReply(METRICS_KEY, "must be a MetricRecord")
    return receipt


def _scalars(metrics: MetricRecord | Mapping[str, Any], *, allowed: frozenset[str]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if key in ("num-examples", "histograms") or key in LEGACY_FIELDS:
            continue
        if key in TRAIN_EVAL_FIELDS and allowed is TRAIN_FIELDS:  # screened by screen_train_evaluation
            continue
        if key not in allowed:
            raise RejectedReply(key, "is not a metric of the wire contract")
        if isinstance(value, list):
            raise RejectedReply(key, "must be a single number, got a list")
        if key in _INT_FIELDS:
            out[key] = _int_in(key, value, *_INT_FIELDS[key])
            continue
        v = _number(key, value)
        if key in _NONNEG_FIELDS and v < 0:
            raise RejectedReply(key, f"must be >= 0, got {v}")
        if key in _UPPER:
            bound, inclusive = _UPPER[key]
            if v > bound or (v == bound and not inclusive):
                raise RejectedReply(key, f"must be {'<=' if inclusive else '<'} {bound:g}, got {v}")
        out[key] = v
    return out


#: Largest ``.npy`` header (magic, version, length, dict) an array's bytes may carry besides its data.
MAX_NPY_HEADER = 4096
_NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _check_encoding(field: str, arr: Array, *, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Check what an Array says about itself, and its byte length, before anything is decoded
    (``np.load`` allocates whatever shape the ``.npy`` header states): the serialisation type, the
    declared dtype and shape, the ``.npy`` header's own dtype and shape, and a byte length of exactly
    header + the model's size."""
    if arr.stype != SType.NUMPY:
        raise RejectedReply(field, f"serialisation {str(arr.stype)[:40]!r}, expected {SType.NUMPY!r}")
    if str(arr.dtype) != str(dtype):
        raise RejectedReply(field, f"dtype {str(arr.dtype)[:40]}, the model's is {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise RejectedReply(field, f"shape {tuple(arr.shape)[:8]}, the model's is {tuple(shape)}")
    data = arr.data
    if not isinstance(data, bytes):
        raise RejectedReply(field, "data must be bytes")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not size < len(data) <= size + MAX_NPY_HEADER:
        raise RejectedReply(field, f"{len(data)} bytes, expected {size} bytes of data plus a header of at most "
                                   f"{MAX_NPY_HEADER}")
    fp = io.BytesIO(data)
    try:
        version = npy_format.read_magic(fp)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        header_shape, _fortran, header_dtype = reader(fp, max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # noqa: BLE001 - an unreadable header is a rejection, not a crash
        raise RejectedReply(field, f"unreadable array header ({type(exc).__name__})") from None
    if header_dtype != dtype or tuple(header_shape) != tuple(shape):
        raise RejectedReply(field, f"its header says dtype {header_dtype}, shape {tuple(header_shape)[:8]}; the "
                                   f"model's are {dtype}, {tuple(shape)}")
    if len(data) - fp.tell() != size:
        raise RejectedReply(field, f"{len(data) - fp.tell()} bytes of data, expected {size}")


def _decode(name: str, arr: Any, *, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(arr, Array):
        raise RejectedReply(f"arrays.{name}", f"must be an Array, got {type(arr).__name__}")
    try:
        _check_encoding(f"arrays.{name}", arr, shape=tuple(shape), dtype=dtype)
    except RejectedReply:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed metadata is a rejection, not a crash
        raise RejectedReply(f"arrays.{name}", f"malformed array metadata ({type(exc).__name__})") from None
    try:
        value = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - anything undecodable is a rejection, not a crash
        raise RejectedReply(f"arrays.{name}", f"cannot be decoded ({type(exc).__name__})") from None
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise RejectedReply(f"arrays.{name}", f"dtype {got}, the model's is {dtype}")
    if tuple(value.shape) != tuple(shape):
        raise RejectedReply(f"arrays.{name}", f"shape {tuple(value.shape)}, the model's is {tuple(shape)}")
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise RejectedReply(f"arrays.{name}", f"{bad} non-finite values (NaN or Inf)")
    return value


def screen_train(
    content: RecordDict,
    *,
    expected_shapes: Mapping[str, tuple[int, ...]],
    expected_dtypes: Mapping[str, str] | None = None,
    update_encoding: str = "float32",
    sent_global: Mapping[str, np.ndarray] | None = None,
    num_classes: int | None = None,
) -> ScreenedReply:
    """Check a train reply's values; raises :class:`RejectedReply` naming the field.

    ``update_encoding="float16-delta"``: the floating arrays are float16 differences, added to
    ``sent_global`` (the coordinator's own copy of the global arrays it sent this round); the
    returned arrays are then the node's weights in the model's dtypes. ``num_classes``: check an
    evaluation the reply carries (``val-`` metrics); without it such metrics are ignored."""
    receipt = _records(content, kind="train", want={ARRAYS_KEY, METRICS_KEY})
    arrays = content[ARRAYS_KEY]
    if not isinstance(arrays, ArrayRecord):
        raise RejectedReply(ARRAYS_KEY, "must be an ArrayRecord")
    names = set(arrays.keys())
    if names != set(expected_shapes):
        missing, extra = sorted(set(expected_shapes) - names), sorted(names - set(expected_shapes))
        raise RejectedReply(ARRAYS_KEY, f"names differ from the model (missing {missing}, unexpected {extra})")
    dtypes = expected_dtypes or {}
    if update_encoding == "float32":
        decoded = {name: _decode(name, arrays[name], shape=expected_shapes[name],
                                 dtype=np.dtype(dtypes.get(name, "float32")))
                   for name in expected_shapes}
    else:
        decoded = _decode_deltas(arrays, expected_shapes=expected_shapes, dtypes=dtypes, encoding=update_encoding,
                                 sent_global=sent_global)
    checked = screen_train_metrics(content[METRICS_KEY])
    evaluation, refused = None, None
    if num_classes is not None:
        evaluation, refused = screen_train_evaluation(content[METRICS_KEY], num_classes=num_classes)
    return ScreenedReply(num_examples=checked.num_examples, metrics=checked.metrics, arrays=decoded, receipt=receipt,
                         evaluation=evaluation, evaluation_refused=refused)


def _decode_deltas(arrays: ArrayRecord, *, expected_shapes: Mapping[str, tuple[int, ...]],
                   dtypes: Mapping[str, str], encoding: str,
                   sent_global: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A delta-encoded update added to the coordinator's own copy of the global arrays it sent."""
    if sent_global is None or set(sent_global) != set(expected_shapes):
        raise ProtocolError("a delta-encoded update needs the coordinator's own copy of the global arrays it sent")
    out: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes.items():
        model_dtype = np.dtype(dtypes.get(name, "float32"))
        wire = np.dtype(update_dtype(str(model_dtype), encoding))
        value = _decode(name, arrays[name], shape=shape, dtype=wire)
        if wire == model_dtype:  # a non-floating array travels as itself
            out[name] = value
            continue
        base = np.asarray(sent_global[name], dtype=model_dtype)
        full = (base.astype(np.float32) + value.astype(np.float32)).astype(model_dtype)
        if not np.all(np.isfinite(full)):
            raise RejectedReply(f"arrays.{name}", "the global model plus this update is not finite")
        out[name] = full
    return out


def screen_train_evaluation(metrics: MetricRecord, *, num_classes: int) -> tuple[ScreenedReply | None, int | None]:
    """The evaluation inside a train reply (``val-`` metrics) as an evaluate-shaped reply, or the
    code of its refusal (``val-refused``), or (None, None) when there is none; raises
    :class:`RejectedReply` naming the field when it is malformed."""
    present = {k for k in metrics.keys() if k in TRAIN_EVAL_FIELDS}
    if not present:
        return None, None
    if "val-refused" in present:
        if present != {"val-refused"}:
            raise RejectedReply("val-refused", "comes alone (a refused evaluation releases nothing)")
        code = _int_in("val-refused", metrics["val-refused"], 4000, 4003)
        if code not in REFUSAL_CODES:
            raise RejectedReply("val-refused", f"{code} is not a refusal code")
        return None, code
    inner = {k[len("val-"):]: metrics[k] for k in present}
    for need in ("num-examples", "histograms", "round"):
        if need not in inner:
            raise RejectedReply(f"val-{need}", "is required with an evaluation in a train reply")
    n = _int_in("val-num-examples", inner["num-examples"], 0, MAX_EXAMPLES)
    hist = _histograms("val-histograms", inner["histograms"], num_classes=num_classes)
    scalars = _scalars({k: v for k, v in inner.items() if k not in ("num-examples", "histograms")},
                       allowed=EVAL_FIELDS)
    return ScreenedReply(num_examples=n, metrics=scalars, histograms=hist), None


def _histograms(field: str, hist: Any, *, num_classes: int) -> np.ndarray:
    """C x 2 x HIST_BINS signed integer counts of magnitude at most MAX_EXAMPLES."""
    want = num_classes * 2 * HIST_BINS
    if not isinstance(hist, list):
        raise RejectedReply(field, "must be a list of counts")
    if len(hist) != want:
        raise RejectedReply(field, f"holds {len(hist)} counts, expected {num_classes}x2x{HIST_BINS} = {want}")
    counts = np.empty(want, dtype=np.int64)
    for i, v in enumerate(hist):
        if not _is_int(v) or not -MAX_EXAMPLES <= int(v) <= MAX_EXAMPLES:
            raise RejectedReply(field, f"count {i} is {v!r}, not an integer in [-{MAX_EXAMPLES}, {MAX_EXAMPLES}]")
        counts[i] = int(v)
    return counts.reshape(num_classes, 2, HIST_BINS)


def screen_train_metrics(metrics: MetricRecord) -> ScreenedReply:
    """Only the metrics of a train reply (the SecAgg+ path, where the update travels masked and is
    checked once unmasked); raises :class:`RejectedReply` naming the field."""
    if not isinstance(metrics, MetricRecord):
        raise RejectedReply(METRICS_KEY, "must be a MetricRecord")
    if "num-examples" not in metrics:
        raise RejectedReply("num-examples", "is required")
    n = _int_in("num-examples", metrics["num-examples"], 1, MAX_EXAMPLES)
    return ScreenedReply(num_examples=n, metrics=_scalars(metrics, allowed=TRAIN_FIELDS))


def screen_evaluate(content: RecordDict, *, num_classes: int) -> ScreenedReply:
    """Check an evaluate reply's values; raises :class:`RejectedReply` naming the field."""
    receipt = _records(content, kind="evaluate", want={METRICS_KEY})
    metrics = content[METRICS_KEY]
    if "num-examples" not in metrics:
        raise RejectedReply("num-examples", "is required")
    n = _int_in("num-examples", metrics["num-examples"], 0, MAX_EXAMPLES)
    if "histograms" not in metrics:
        raise RejectedReply("histograms", "is required")
    counts = _histograms("histograms", metrics["histograms"], num_classes=num_classes)
    return ScreenedReply(num_examples=n, metrics=_scalars(metrics, allowed=EVAL_FIELDS), histograms=counts,
                         receipt=receipt)


def partition_id(metrics: Any) -> int | None:
    """A simulated hospital's partition id if the reply states a sane one, else None (never raises)."""
    try:
        value = metrics["partition-id"]
    except (KeyError, TypeError):
        return None
    return int(value) if _is_int(value) and 0 <= int(value) <= MAX_COUNT else None


def weighted_total(weights: list[float]) -> float | None:
    """The sum of aggregation weights, or None when a weighted mean over them is undefined
    (no weights, a non-finite or negative weight, or a sum <= 0): never divide by it then."""
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        return None
    total = float(sum(weights))
    return total if total > 0 and math.isfinite(total) else None


def all_finite(arrays: ArrayRecord) -> str | None:
    """The name of the first array of ``arrays`` holding a NaN/Inf (or not decodable), else None."""
    for name, arr in arrays.items():
        try:
            value = arr.numpy()
        except Exception:  # noqa: BLE001
            return name
        if not np.all(np.isfinite(value)):
            return name
    return None
