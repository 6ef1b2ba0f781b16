"""The hospital's ClientApp for a study under secure aggregation (Flower SecAgg+).

Training requests reach this app only through Flower's :func:`secaggplus_mod`: the mod runs the
key agreement and secret sharing with the other hospitals, hands the round's training request to
:func:`train` (DP-SGD with the site's own privacy ledger, node policy and audit log: the very
code path of :mod:`fedrad.client.app`), and replaces the reply's arrays by the masked, quantized
**update** (local weights minus the global weights, weighted by the example count). So no
plaintext update of this hospital ever leaves it; the coordinator receives only
``quantize(r * update) + masks (mod 2**32)``. Alongside travel the allow-listed scalar metrics
(number of examples, epsilon, train loss, ...), unmasked, exactly as in the plain path.

A training request without SecAgg+ records (a study without secure aggregation) is answered by
:func:`fedrad.client.app.train` unchanged, so this app can serve every study; the node policy's
``require_secure_aggregation`` refuses such requests there.

Evaluation requests are plain message-API requests, answered by
:func:`fedrad.client.app.evaluate_global` (per-site validation counts, as without SecAgg).

A refusal (privacy budget, node policy, malformed request) is answered with the same ``Error``
codes as :mod:`fedrad.client.app`; for the SecAgg+ protocol it is a dropout after key sharing,
which the coordinator recovers from as long as the round keeps at least the threshold of
hospitals.

Test hook (off by default): with ``FEDRAD_SECAGG_CAPTURE_DIR`` set in a *simulated* hospital's
environment, the plaintext update is also written there (``round-NNNN-hospital-K.npz``) so a
test can compare it with what the coordinator saw. A deployed node (no ``partition-id``) never
writes it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedrad.common.errors import FedradError, ProtocolError
from fedrad.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY

from . import app as plain

log = logging.getLogger(__name__)

#: Must match :data:`fedrad.server.secagg.ARRAY_NAMES_KEY` (not imported: hospitals never import
#: coordinator code).
ARRAY_NAMES_KEY = "array-names"
CAPTURE_ENV = "FEDRAD_SECAGG_CAPTURE_DIR"

app = ClientApp()


class _Refused(Exception):
    """Carries a refusal (an ``Error`` reply) out through ``secaggplus_mod``, which expects content."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def refusals_as_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: a refusal inside the SecAgg+ stage becomes the usual ``Error`` reply."""
    try:
        return call_next(msg, context)
    except _Refused as refused:
        log.warning("secure-aggregation round: training refused (%s)", refused.error.reason)
        return Message(refused.error, reply_to=msg)


def _secagg_state(context: Context) -> tuple[float, float]:
    """(clipping_range, max_weight) agreed in the SecAgg+ setup stage of this round."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:
        raise ProtocolError("training request outside a SecAgg+ round")
    return float(state.get("clipping_range", 0.0)), float(state.get("max_weight", 0.0))  # type: ignore[arg-type]


def _plain_request(msg: Message) -> tuple[Message, list[str], list[np.ndarray]]:
    """The legacy fit request as the message-API request :mod:`fedrad.client.app` understands."""
    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"not a SecAgg+ training request: {exc}") from None
    cfg = dict(fitins.config)
    raw_names = cfg.pop(ARRAY_NAMES_KEY, None)
    if not isinstance(raw_names, str):
        raise ProtocolError(f"training request lacks {ARRAY_NAMES_KEY!r}")
    try:
        names = json.loads(raw_names)
    except json.JSONDecodeError:
        raise ProtocolError(f"{ARRAY_NAMES_KEY!r} is not a JSON list") from None
    arrays = parameters_to_ndarrays(fitins.parameters)
    if not isinstance(names, list) or len(names) != len(arrays) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"{ARRAY_NAMES_KEY!r} does not name the {len(arrays)} arrays sent")
    content = RecordDict({
        ARRAYS_KEY: ArrayRecord(OrderedDict((n, Array(a)) for n, a in zip(names, arrays))),
        CONFIG_KEY: ConfigRecord(cfg),  # type: ignore[arg-type]
    })
    request = copy.copy(msg)  # same metadata, own content (the incoming message is left as it is)
    request.content = content
    return request, names, arrays


def _capture(context: Context, *, server_round: int, site: str, num_examples: int, names: list[str],
             update: list[np.ndarray]) -> None:
    folder = os.environ.get(CAPTURE_ENV)
    if not folder or "partition-id" not in context.node_config:
        return
    path = Path(folder) / f"round-{server_round:04d}-{site}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {f"u{i}": u for i, u in enumerate(update)}
    np.savez(path, num_examples=np.int64(num_examples), names=np.array(names), **arrays)
    log.debug("test hook: plaintext update of %s written to %s", site, path)


def _warn_clipped(site: str, update: list[np.ndarray], *, num_examples: int, clipping_range: float,
                  max_weight: float) -> None:
    """SecAgg+ clips each weighted coordinate to +-clipping_range; say so when it bites."""
    if clipping_range <= 0 or max_weight <= 0:
        return
    ratio = num_examples / max_weight
    clipped = sum(int(np.count_nonzero(np.abs(u) * ratio > clipping_range)) for u in update)
    if ratio > 1:
        log.warning("%s: %d training examples exceed the study's SecAgg max_weight %g", site, num_examples, max_weight)
    if clipped:
        total = sum(u.size for u in update)
        log.warning("%s: %d of %d update coordinates exceed the SecAgg clipping range %g and are clipped; "
                    "the aggregate is biased (raise secure_aggregation.clipping_range)",
                    site, clipped, total, clipping_range)


def secagg_fit(msg: Message, context: Context) -> Message:
    """DP training of one round, answered in the legacy ``FitRes`` form ``secaggplus_mod`` masks."""
    try:
        request, names, global_arrays = _plain_request(msg)
        clipping_range, max_weight = _secagg_state(context)
    except FedradError as exc:
        raise _Refused(Error(code=plain.error_code(exc), reason=f"{type(exc).__name__}: {exc}")) from None
    reply = plain.train_reply(request, context, secure_aggregation=True)
    if reply.has_error():
        raise _Refused(reply.error)
    trained = cast(ArrayRecord, reply.content[ARRAYS_KEY])
    metrics = dict(reply.content[METRICS_KEY])
    num_examples = int(metrics["num-examples"])  # type: ignore[arg-type]
    update = [np.asarray(trained[name].numpy(), dtype=np.float64) - np.asarray(g, dtype=np.float64)
              for name, g in zip(names, global_arrays)]
    server_round = int(request.content[CONFIG_KEY]["server-round"]) + int(  # type: ignore[arg-type]
        request.content[CONFIG_KEY].get("round-offset", 0))  # type: ignore[arg-type]
    site = f"hospital-{int(metrics['partition-id']) + 1}" if "partition-id" in metrics else "site"  # type: ignore[arg-type]
    _warn_clipped(site, update, num_examples=num_examples, clipping_range=clipping_range, max_weight=max_weight)
    _capture(context, server_round=server_round, site=site, num_examples=num_examples, names=names, update=update)
    fitres = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(update),
                    num_examples=num_examples, metrics=metrics)  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _secagg_round(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage: Flower's mod (keys, shares, masking), fedrad's DP training inside it."""
    return refusals_as_errors(msg, context, lambda m, c: secaggplus_mod(m, c, secagg_fit))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """SecAgg+ stages go through the mod; a plain (unmasked) training request gets the plain app's
    answer, which the node's policy refuses when it requires secure aggregation."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content:
        return _secagg_round(msg, context)
    return plain.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return plain.evaluate_global(msg, context)
