"""The outgoing-message filter: nothing but the model's arrays and allow-listed aggregate metrics leaves.

Complements tests/test_core_protocol_app.py (records, allow-lists, list lengths) with the ways
data could be smuggled inside otherwise well-formed records.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedrad.common.errors import ProtocolError
from fedrad.common.metrics import HIST_BINS
from fedrad.common.protocol import check_reply

SHAPES = {"w": (3, 4), "b": (3,)}


def _arrays(**extra: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(3, 4), "b": torch.zeros(3), **extra})


def _train(arrays: ArrayRecord | None = None, **metrics: object) -> RecordDict:
    return RecordDict({"arrays": arrays or _arrays(), "metrics": MetricRecord({"num-examples": 8, **metrics})})


def _eval(**metrics: object) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": 8, **metrics})})


@pytest.mark.parametrize(
    ("content", "kind", "match"),
    [
        # an extra tensor (e.g. a batch of images) beside the model's weights
        (_train(_arrays(images=torch.zeros(8, 1, 28, 28))), "train", "unexpected \\['images'\\]"),
        # the right names, one of them stretched to carry data
        (_train(ArrayRecord({"w": torch.zeros(3, 4), "b": torch.zeros(3 + 784)})), "train", "wrong shapes"),
        # weights renamed: the model's own array missing
        (_train(ArrayRecord({"w": torch.zeros(3, 4), "bias": torch.zeros(3)})), "train", "missing \\['b'\\]"),
        # counts that are not counts
        # (signed noisy counts are allowed since issue 10; floats and huge magnitudes are not)
        (_eval(histograms=[4.5] + [0.0] * (2 * 2 * HIST_BINS - 1)), "evaluate", "integer counts"),
        (_eval(histograms=[10**8, -1] + [0] * (2 * 2 * HIST_BINS - 2)), "evaluate", "integer counts"),
        (_eval(histograms=[0] * (2 * 2 * HIST_BINS + 1)), "evaluate", f"2x2x{HIST_BINS}"),
        # per-example values in a scalar metric name
        (_train(epsilon=[0.1, 0.2]), "train", "single number"),
        (_train(histograms=[1, 2, 3, 4]), "train", "not on the allow-list"),
        # unprotected statistics (issue 9, point 2/3): loss, timing, exact metrics
        (_train(train_loss=0.3), "train", "train_loss"),
        (_train(train_seconds=1.5), "train", "train_seconds"),
        (_eval(confusion=[3, 1, 0, 4]), "evaluate", "confusion"),
        (_eval(auc=0.8), "evaluate", "auc"),
        # identifiers under made-up metric names
        (_eval(site_name=1.0), "evaluate", "site_name"),
        (_train(**{"mrn": 12345678}), "train", "mrn"),
    ],
)
def test_filter_rejects_smuggled_content(content: RecordDict, kind: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_reply(content, kind=kind, expected_shapes=SHAPES if kind == "train" else None, num_classes=2)


def test_filter_accepts_exactly_the_model_and_aggregates() -> None:
    check_reply(_train(round=1, epsilon=1.2, delta=1e-5, study_epsilon=1.0, study_epsilon_budget=8.0),
                kind="train", expected_shapes=SHAPES)
    check_reply(_eval(round=2, epsilon=0.4, histograms=list(np.zeros(2 * 2 * HIST_BINS, dtype=int).tolist())),
                kind="evaluate", num_classes=2)


def test_flower_records_cannot_hold_text_or_bytes() -> None:
    # Free text, bytes and nested mappings cannot even be put into a MetricRecord.
    for value in ("patient 123", b"\x00", {"a": 1}, True):
        with pytest.raises(TypeError):
            MetricRecord({"num-examples": value})  # type: ignore[dict-item]
