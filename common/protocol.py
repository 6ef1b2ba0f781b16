"""What crosses the wire between coordinator and hospitals, and the filter that enforces it.

A hospital's reply may carry exactly: the model weights (``arrays``, keys and shapes of the
study's model), whitelisted DP-released or data-independent metrics (``metrics``) and the
node's audit receipt (``receipt``: its audit-log head after recording the reply). No images, no
per-example outputs, no identifiers, no free text, no unprotected statistics (loss, timing). :func:`check_reply` is applied by the hospital before
anything leaves, and again by the coordinator on receipt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .errors import ProtocolError
from .metrics import HIST_BINS

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: The one ConfigRecord a reply may carry: the node's audit-log head right after it recorded the reply.
RECEIPT_KEY = "receipt"
RECEIPT_FIELDS = frozenset({"audit-head", "audit-count"})

#: Scalar metrics a hospital may report after local training. Every one is DP-protected and
#: charged to the node's ledger, or a fixed, data-independent quantity: ``num-examples`` is the
#: training set's DP-released size (released once, re-sent unchanged); ``round`` is the node's own
#: count; the rest describe the mechanism and the budgets. No loss, no timing (data-dependent).
#: Config key of a train message asking the node to evaluate the incoming global model (the
#: previous round's aggregate) on its validation split before training, and to return the released
#: histograms in the train reply (issue 14: one model transfer fewer per round). The node spends
#: that evaluation exactly like a plain evaluate message (validation account, its own count and
#: allowance); a refused evaluation leaves the training untouched and is reported as ``val-refused``.
EVALUATE_FIRST_KEY = "evaluate-first"
#: Metrics of that evaluation inside a train reply: the evaluate reply's metrics under a ``val-``
#: prefix, or ``val-refused`` (the fixed refusal code) when the node refused the evaluation.
TRAIN_EVAL_METRICS = frozenset(
    {"val-num-examples", "val-histograms", "val-round", "val-epsilon", "val-epsilon_budget", "val-refused",
     "val-histogram-noise-std"}
)
#: The fields an evaluation inside a train reply must carry together (``val-epsilon*`` only with DP).
TRAIN_EVAL_REQUIRED = frozenset({"val-num-examples", "val-histograms", "val-round"})
TRAIN_METRICS = frozenset(
    {
        "num-examples",
        "partition-id",  # simulation only: which simulated hospital (not a patient identifier)
        "round",
        "steps",
        "sample_rate",
        "noise_multiplier",
        "max_grad_norm",
        "delta",
        "epsilon",
        "epsilon_budget",
        "study_epsilon",
        "study_epsilon_budget",
    }
) | TRAIN_EVAL_METRICS
#: Metrics a hospital may report after evaluating the global model on its validation data: the
#: per-class score histograms, DP-released with Gaussian noise (see :mod:`fedrad.client.privacy.releases`),
#: and their total (post-processing). Every validation figure is derived from them by the coordinator.
#: ``histogram-noise-std`` is the standard deviation of the Gaussian noise on each count (0 without
#: DP): a property of the mechanism, fixed by the node's own privacy plan (budget, delta, planned
#: evaluations), never by the data; the coordinator needs it to tell a better round from noise.
EVAL_METRICS = frozenset({"num-examples", "partition-id", "histograms", "round", "epsilon", "epsilon_budget",
                          "histogram-noise-std"})
#: Metrics that must be whole numbers.
INT_METRICS = frozenset({"num-examples", "partition-id", "round", "steps", "val-num-examples", "val-round",
                         "val-refused"})
#: ``Error.code`` of a hospital's reply when it refuses work.
ERR_REFUSED = 4000  # generic: bad data, bad config, node-side failure
ERR_BUDGET = 4001  # the round would exceed the site's privacy budget (or the study's turns are used up)
ERR_PROTOCOL = 4002  # the request was malformed
ERR_POLICY = 4003  # the request breaks the hospital's node policy

#: The only metrics that may be lists: aggregate counts, capped in length. Every other metric is
#: one number, so nothing per-example can ride along in an allow-listed name.
LIST_METRICS = frozenset({"histograms", "val-histograms"})
MAX_LIST_LEN = 10_000
#: Largest magnitude of a histogram count. Noisy counts are signed (issue 10: rounded, not clipped,
#: so that the coordinator's pooled sum is unbiased); the node bounds them to this range.
HIST_COUNT_LIMIT = 10**7
#: ``federation.update_encoding`` values: "float32" (the trained weights) or "float16-delta" (the
#: trained weights minus the global model the node received, float16; floating arrays only).
UPDATE_ENCODINGS = ("float32", "float16-delta")


def update_dtype(model_dtype: str, encoding: str) -> str:
    """The dtype an array of the model's ``model_dtype`` travels in under ``encoding``."""
    if encoding not in UPDATE_ENCODINGS:
        raise ProtocolError(f"unknown update encoding {encoding!r} (known: {', '.join(UPDATE_ENCODINGS)})")
    if encoding == "float16-delta" and np.dtype(model_dtype).kind == "f":
        return "float16"
    return str(np.dtype(model_dtype))
_HEX = frozenset("0123456789abcdef")


def check_receipt(record: object) -> None:
    """Raise :class:`ProtocolError` unless ``record`` is a well-formed audit receipt."""
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"reply: '{RECEIPT_KEY}' must be a ConfigRecord, got {type(record).__name__}")
    if set(record.keys()) != RECEIPT_FIELDS:
        raise ProtocolError(f"reply: '{RECEIPT_KEY}' must hold exactly {sorted(RECEIPT_FIELDS)}, got {sorted(record.keys())}")
    head, count = record["audit-head"], record["audit-count"]
    if not isinstance(head, str) or len(head) != 64 or not set(head) <= _HEX:
        raise ProtocolError(f"reply: '{RECEIPT_KEY}' audit-head must be 64 lowercase hex characters")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ProtocolError(f"reply: '{RECEIPT_KEY}' audit-count must be an int >= 1, got {count!r}")


#: Bytes of a serialised array beyond its values (the .npy header); anything larger is refused undecoded.
_NPY_HEADER_SLACK = 4096


def check_reply(
    content: RecordDict,
    *,
    kind: str,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    num_classes: int | None = None,
    update_encoding: str = "float32",
) -> None:
    """Raise :class:`ProtocolError` unless ``content`` is a well-formed, allowed reply.

    ``update_encoding`` (train): the study's ``federation.update_encoding``; with "float16-delta"
    every array must be float16 (the model's arrays are float32), else float32."""
    if kind not in ("train", "evaluate"):
        raise ProtocolError(f"unknown message kind {kind!r}")
    allowed_metrics = TRAIN_METRICS if kind == "train" else EVAL_METRICS
    want_records = {ARRAYS_KEY, METRICS_KEY} if kind == "train" else {METRICS_KEY}
    names = set(content.keys())
    if names - {RECEIPT_KEY} != want_records:
        raise ProtocolError(f"{kind} reply must hold records {sorted(want_records)} (and optionally "
                            f"{RECEIPT_KEY!r}), got {sorted(names)}")
    if RECEIPT_KEY in names:
        check_receipt(content[RECEIPT_KEY])
    metrics = content[METRICS_KEY]
    if not isinstance(metrics, MetricRecord):
        raise ProtocolError(f"{kind} reply: '{METRICS_KEY}' must be a MetricRecord, got {type(metrics).__name__}")
    extra = sorted(set(metrics.keys()) - allowed_metrics)
    if extra:
        raise ProtocolError(f"{kind} reply: metrics not on the allow-list: {extra}")
    if "num-examples" not in metrics:
        raise ProtocolError(f"{kind} reply: metric 'num-examples' is required")
    for key, value in metrics.items():
        if isinstance(value, list):
            if key not in LIST_METRICS:
                raise ProtocolError(f"{kind} reply: metric {key!r} must be a single number, got a list")
            if len(value) > MAX_LIST_LEN:
                raise ProtocolError(f"{kind} reply: metric {key!r} has {len(value)} values (max {MAX_LIST_LEN})")
            if any(isinstance(v, bool) or not isinstance(v, int) or abs(v) > HIST_COUNT_LIMIT for v in value):
                raise ProtocolError(f"{kind} reply: metric {key!r} must hold integer counts of magnitude at "
                                    f"most {HIST_COUNT_LIMIT}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{kind} reply: metric {key!r} must be a number, got {type(value).__name__}")
        elif not math.isfinite(value):
            raise ProtocolError(f"{kind} reply: metric {key!r} is not finite ({value!r})")
        elif key in INT_METRICS and not isinstance(value, int):
            raise ProtocolError(f"{kind} reply: metric {key!r} must be an int, got {value!r}")
    n = metrics["num-examples"]
    if isinstance(n, list) or n < (1 if kind == "train" else 0):  # type: ignore[operator]
        raise ProtocolError(f"{kind} reply: 'num-examples' must be >= {1 if kind == 'train' else 0}, got {n!r}")
    if "round" in metrics and metrics["round"] < 1:  # type: ignore[operator]
        raise ProtocolError(f"{kind} reply: 'round' must be >= 1, got {metrics['round']!r}")
    hist_key = "histograms" if kind == "evaluate" else "val-histograms"
    if num_classes is not None and hist_key in metrics:
        c = num_classes
        if len(metrics[hist_key]) != c * 2 * HIST_BINS:  # type: ignore[arg-type]
            raise ProtocolError(f"{kind} reply: {hist_key!r} must hold {c}x2x{HIST_BINS} counts")
    if kind == "train":
        _check_train_evaluation(metrics)
    if kind == "train":
        arrays = content[ARRAYS_KEY]
        if not isinstance(arrays, ArrayRecord):
            raise ProtocolError(f"train reply: '{ARRAYS_KEY}' must be an ArrayRecord, got {type(arrays).__name__}")
        if expected_shapes is None:  # a train reply is checked against the model, never waved through
            raise ProtocolError("train reply: the expected array names and shapes are required to check it")
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if set(got) != set(expected_shapes):
            missing = sorted(set(expected_shapes) - set(got))
            unexpected = sorted(set(got) - set(expected_shapes))
            raise ProtocolError(f"train reply: array names differ from the model (missing {missing}, unexpected {unexpected})")
        bad = sorted(k for k in got if got[k] != tuple(expected_shapes[k]))
        if bad:
            raise ProtocolError(f"train reply: arrays with wrong shapes: {bad}")
        dtype = np.dtype(update_dtype("float32", update_encoding))
        for name, arr in sorted(arrays.items()):
            # Metadata and size first: decoding pre-allocates whatever shape the payload's header claims.
            if str(arr.dtype) != str(dtype):
                raise ProtocolError(f"train reply: arrays.{name}: {arr.dtype}, not {dtype}")
            want = dtype.itemsize * int(np.prod(expected_shapes[name], dtype=np.int64))
            if len(arr.data) > want + _NPY_HEADER_SLACK:
                raise ProtocolError(f"train reply: arrays.{name}: {len(arr.data)} bytes for {want} bytes of values")
            nd = arr.numpy()
            if nd.dtype != dtype or tuple(nd.shape) != tuple(expected_shapes[name]):
                raise ProtocolError(f"train reply: arrays.{name}: payload is {nd.dtype}{tuple(nd.shape)}, "
                                    f"not {dtype}{tuple(expected_shapes[name])}")
            if not np.isfinite(nd).all():
                raise ProtocolError(f"train reply: arrays.{name}: holds non-finite values")
    for name in names - {RECEIPT_KEY}:
        if isinstance(content[name], ConfigRecord):
            raise ProtocolError(f"{kind} reply: config records may not leave a hospital ({name!r})")


def _check_train_evaluation(metrics: MetricRecord) -> None:
    """A train reply carries either no evaluation, a whole one, or only its refusal code."""
    present = set(metrics.keys()) & TRAIN_EVAL_METRICS
    if not present:
        return
    if "val-refused" in present:
        if present != {"val-refused"}:
            raise ProtocolError("train reply: 'val-refused' comes alone (a refused evaluation releases nothing)")
        if metrics["val-refused"] not in (ERR_REFUSED, ERR_BUDGET, ERR_PROTOCOL, ERR_POLICY):
            raise ProtocolError(f"train reply: 'val-refused' must be a refusal code, got {metrics['val-refused']!r}")
        return
    missing = sorted(TRAIN_EVAL_REQUIRED - present)
    if missing:
        raise ProtocolError(f"train reply: an evaluation needs {sorted(TRAIN_EVAL_REQUIRED)}, missing {missing}")
    if metrics["val-num-examples"] < 0:  # type: ignore[operator]
        raise ProtocolError("train reply: 'val-num-examples' must be >= 0")
    if metrics["val-round"] < 1:  # type: ignore[operator]
        raise ProtocolError("train reply: 'val-round' must be >= 1")

