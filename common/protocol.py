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
)
#: Metrics a hospital may report after evaluating the global model on its validation data: the
#: per-class score histograms, DP-released with Gaussian noise (see :mod:`fedrad.client.privacy.releases`),
#: and their total (post-processing). Every validation figure is derived from them by the coordinator.
EVAL_METRICS = frozenset({"num-examples", "partition-id", "histograms", "round", "epsilon", "epsilon_budget"})
#: Metrics that must be whole numbers.
INT_METRICS = frozenset({"num-examples", "partition-id", "round", "steps"})
#: ``Error.code`` of a hospital's reply when it refuses work.
ERR_REFUSED = 4000  # generic: bad data, bad config, node-side failure
ERR_BUDGET = 4001  # the round would exceed the site's privacy budget (or the study's turns are used up)
ERR_PROTOCOL = 4002  # the request was malformed
ERR_POLICY = 4003  # the request breaks the hospital's node policy

#: The only metrics that may be lists: aggregate counts, capped in length. Every other metric is
#: one number, so nothing per-example can ride along in an allow-listed name.
LIST_METRICS = frozenset({"histograms"})
MAX_LIST_LEN = 10_000
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
) -> None:
    """Raise :class:`ProtocolError` unless ``content`` is a well-formed, allowed reply."""
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
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
                raise ProtocolError(f"{kind} reply: metric {key!r} must hold non-negative integer counts")
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
    if kind == "evaluate" and num_classes is not None:
        c = num_classes
        if "histograms" in metrics and len(metrics["histograms"]) != c * 2 * HIST_BINS:  # type: ignore[arg-type]
            raise ProtocolError(f"evaluate reply: 'histograms' must hold {c}x2x{HIST_BINS} counts")
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
        for name, arr in sorted(arrays.items()):
            # Metadata and size first: decoding pre-allocates whatever shape the payload's header claims.
            if str(arr.dtype) != "float32":
                raise ProtocolError(f"train reply: arrays.{name}: {arr.dtype}, not float32")
            want = 4 * int(np.prod(expected_shapes[name], dtype=np.int64))
            if len(arr.data) > want + _NPY_HEADER_SLACK:
                raise ProtocolError(f"train reply: arrays.{name}: {len(arr.data)} bytes for {want} bytes of values")
            nd = arr.numpy()
            if nd.dtype != np.float32 or tuple(nd.shape) != tuple(expected_shapes[name]):
                raise ProtocolError(f"train reply: arrays.{name}: payload is {nd.dtype}{tuple(nd.shape)}, "
                                    f"not float32{tuple(expected_shapes[name])}")
            if not np.isfinite(nd).all():
                raise ProtocolError(f"train reply: arrays.{name}: holds non-finite values")
    for name in names - {RECEIPT_KEY}:
        if isinstance(content[name], ConfigRecord):
            raise ProtocolError(f"{kind} reply: config records may not leave a hospital ({name!r})")

