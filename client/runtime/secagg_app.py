"""The hospital's ClientApp for a study under secure aggregation (Flower SecAgg+).

Training requests reach this app only through Flower's :func:`secaggplus_mod`: the mod runs the
key agreement and secret sharing with the other hospitals, hands the round's training request to
:func:`train` (DP-SGD with the site's own privacy ledger, node policy and audit log: the very
code path of :mod:`fedrad.client.runtime.app`), and replaces the reply's arrays by the masked, quantized
**update** (local weights minus the global weights, weighted by the example count). So no
plaintext update of this hospital ever leaves it; the coordinator receives only
``quantize(r * update) + masks (mod 2**32)``. Alongside travel, unmasked, exactly the contract's
allow-listed train metrics (as in the plain path; the example count is the node's DP-released
one) and the audit-log receipt; :func:`check_outgoing` refuses to send anything else.

The hospital does not take the coordinator's word for the protocol's safety parameters
(:func:`guard`): it refuses a setup whose reconstruction threshold is below :func:`min_threshold`
(the coordinator plus one colluding hospital could then unmask an individual update) or that
samples fewer than 3 hospitals, more neighbours' keys than the agreed share count, and an unmask
request that names a hospital both alive and dropped, names this hospital dropped, names
hospitals it never exchanged keys with, or fewer than 3 alive ones.

Deployment: SecAgg+ keeps its per-round secrets in ``Context.state``, which the SuperNode holds
between messages. A SuperNode that restarts mid-round has lost them: its next message of that
round fails Flower's stage check and it is a dropout of that round (recovered by the others'
shares if the threshold still holds); the next round starts afresh with a new setup.

A training request without SecAgg+ records (a study without secure aggregation) is answered by
:func:`fedrad.client.runtime.app.train` unchanged, so this app can serve every study; the node policy's
``require_secure_aggregation`` refuses such requests there.

Evaluation requests are plain message-API requests, answered by
:func:`fedrad.client.runtime.app.evaluate_global` (per-site validation counts, as without SecAgg).

A refusal (privacy budget, node policy, malformed request) is answered with the same ``Error``
codes as :mod:`fedrad.client.runtime.app`; for the SecAgg+ protocol it is a dropout after key sharing,
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
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedrad.client.runtime import app as plain
from fedrad.common.errors import FedradError, ProtocolError
from fedrad.common.protocol import ARRAYS_KEY, CONFIG_KEY, ERR_PROTOCOL, METRICS_KEY, TRAIN_METRICS

log = logging.getLogger(__name__)

#: Must match :data:`fedrad.server.secagg.ARRAY_NAMES_KEY` (not imported: hospitals never import
#: coordinator code).
ARRAY_NAMES_KEY = "array-names"
CAPTURE_ENV = "FEDRAD_SECAGG_CAPTURE_DIR"
#: The audit-log receipt record of a train reply (the interface contract).
RECEIPT_KEY = "receipt"
#: Fewest hospitals whose masked sum this hospital helps to unmask.
MIN_SURVIVORS = 3
#: What a masked-vector reply may hold: Flower's legacy FitRes records (parameters emptied by the
#: mod), the SecAgg+ record (the masked vector) and the receipt.
FITRES_RECORDS = frozenset({"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"})


def min_threshold(num_shares: int) -> int:
    """Smallest safe reconstruction threshold for ``num_shares`` shares (see
    :func:`fedrad.server.secagg.min_threshold`, which must agree: hospitals never import
    coordinator code). ``2 * (t - 1) <= num_shares - 1`` lets a coordinator colluding with one
    hospital unmask an individual update; so ``t >= (num_shares + 3) // 2``, and ``t >= 3``."""
    return max(MIN_SURVIVORS, (int(num_shares) + 3) // 2)


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
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        # Flower's mod rejects out-of-order stages (e.g. after a SuperNode restart lost the round's
        # state), malformed configs and bad ciphertexts this way. The details stay in the node's log;
        # the reply carries only the fixed reason.
        log.warning("secure-aggregation stage rejected: %s: %s", type(exc).__name__, exc)
        return Message(Error(code=ERR_PROTOCOL, reason=f"ProtocolError: SecAgg+ stage rejected ({type(exc).__name__})"),
                       reply_to=msg)


def _refuse(reason: str) -> _Refused:
    log.warning("secure-aggregation round refused: %s", reason)
    return _Refused(Error(code=ERR_PROTOCOL, reason=f"ProtocolError: {reason}"))


def _ints(value: object) -> list[int] | None:
    if isinstance(value, list) and all(type(v) is int for v in value):
        return list(value)
    return None


def guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The hospital's own checks of each SecAgg+ stage request (before Flower's mod acts on it)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if stage == Stage.SETUP:
        assert configs is not None
        sample, shares, t = (configs.get(k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
        mod, target = configs.get(Key.MOD_RANGE), configs.get(Key.TARGET_RANGE)
        if not all(type(v) is int for v in (sample, shares, t, mod, target)):
            raise _refuse("SecAgg+ setup lacks integer sample/share/threshold/range parameters")
        sample, shares, t, mod, target = (cast(int, v) for v in (sample, shares, t, mod, target))
        if sample < MIN_SURVIVORS:
            raise _refuse(f"SecAgg+ round with {sample} hospitals (at least {MIN_SURVIVORS} required)")
        if not MIN_SURVIVORS <= shares <= sample:
            raise _refuse(f"SecAgg+ share count {shares} not in {MIN_SURVIVORS}..{sample}")
        if not min_threshold(shares) <= t <= shares:
            raise _refuse(f"SecAgg+ reconstruction threshold {t} for {shares} shares is below the safe "
                          f"{min_threshold(shares)} (the coordinator and one hospital could unmask an update)")
        if mod > 2**32 or mod.bit_count() != 1 or not 2 <= target < mod // sample:
            raise _refuse(f"SecAgg+ ranges unusable (modulus {mod}, quantization {target}, {sample} hospitals)")
    elif stage == Stage.SHARE_KEYS and state is not None:
        assert configs is not None
        neighbours = len([k for k in configs.keys() if k != Key.STAGE])
        share_num = state.get("share_num")
        if isinstance(share_num, int) and neighbours > share_num:
            raise _refuse(f"{neighbours} neighbours' keys for {share_num} shares")
    elif stage == Stage.UNMASK and state is not None:
        assert configs is not None
        active, dead = _ints(configs.get(Key.ACTIVE_NODE_ID_LIST)), _ints(configs.get(Key.DEAD_NODE_ID_LIST))
        if active is None or dead is None:
            raise _refuse("unmask request without node lists")
        known = set(_ints(state.get("public_keys_dict:K")) or [])
        me = state.get("nid")
        if set(active) & set(dead):
            raise _refuse("unmask request names hospitals both alive and dropped (it would reveal both secrets)")
        if me in dead:
            raise _refuse("unmask request names this hospital dropped; it sent its masked vector")
        if not set(active) | set(dead) <= known:
            raise _refuse("unmask request names hospitals this one never exchanged keys with")
        if len(set(active)) < MIN_SURVIVORS:
            raise _refuse(f"unmask request for a sum of {len(set(active))} hospitals (at least {MIN_SURVIVORS})")
    return call_next(msg, context)


def check_outgoing(reply: Message) -> None:
    """Raise :class:`ProtocolError` unless a SecAgg+ stage reply carries only what the contract
    allows: the SecAgg+ record and, from the masked-vector stage, the emptied FitRes records with
    allow-listed metrics and the receipt."""
    if reply.has_error():
        return
    content = reply.content
    names = set(content.keys())
    if RECORD_KEY_CONFIGS not in names:
        raise ProtocolError("SecAgg+ reply without its SecAgg+ record")
    if names - {RECORD_KEY_CONFIGS}:
        if names - {RECORD_KEY_CONFIGS, RECEIPT_KEY} != FITRES_RECORDS:
            raise ProtocolError(f"SecAgg+ reply holds unexpected records {sorted(names)}")
        if any(len(rec) for rec in content.array_records.values()):
            raise ProtocolError("SecAgg+ reply would carry unmasked arrays")
        metrics = content.config_records["fitres.metrics"]
        extra = sorted(set(metrics.keys()) - TRAIN_METRICS)
        if extra:
            raise ProtocolError(f"SecAgg+ reply: metrics not on the allow-list: {extra}")
        status = content.config_records["fitres.status"]
        if dict(status) != {"code": int(Code.OK.value), "message": "ok"}:
            raise ProtocolError("SecAgg+ reply: status must be the fixed 'ok'")
        if set(content.config_records[RECORD_KEY_CONFIGS].keys()) != {Key.MASKED_PARAMETERS}:
            raise ProtocolError("SecAgg+ reply: the SecAgg+ record may hold only the masked vector")


def _checked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    try:
        check_outgoing(reply)
    except ProtocolError as exc:
        log.error("SecAgg+ reply not sent: %s", exc)
        return Message(Error(code=ERR_PROTOCOL, reason=f"ProtocolError: {exc}"), reply_to=msg)
    return reply


def _secagg_state(context: Context) -> tuple[float, float]:
    """(clipping_range, max_weight) agreed in the SecAgg+ setup stage of this round."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:
        raise ProtocolError("training request outside a SecAgg+ round")
    return float(state.get("clipping_range", 0.0)), float(state.get("max_weight", 0.0))  # type: ignore[arg-type]


def _plain_request(msg: Message) -> tuple[Message, list[str], list[np.ndarray]]:
    """The legacy fit request as the message-API request :mod:`fedrad.client.runtime.app` understands."""
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
    out = compat.fitres_to_recorddict(fitres, keep_input=False)
    if RECEIPT_KEY in reply.content:
        # secaggplus_mod keeps the reply's records (it only empties the arrays and adds its own),
        # so the receipt of the node's audit log travels beside the masked vector
        out[RECEIPT_KEY] = reply.content[RECEIPT_KEY]
    return Message(out, reply_to=msg)


def _secagg_round(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage: Flower's mod (keys, shares, masking), fedrad's DP training inside it."""
    def masked(m: Message, c: Context) -> Message:  # Flower's mod, fedrad's DP training inside it
        return secaggplus_mod(m, c, secagg_fit)

    def guarded(m: Message, c: Context) -> Message:  # the hospital's own checks first
        return guard(m, c, masked)

    # outermost: refusals become Error replies; then nothing beyond the contract leaves
    return refusals_as_errors(msg, context, lambda m, c: _checked(m, c, guarded))


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
