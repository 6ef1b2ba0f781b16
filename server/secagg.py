"""Secure aggregation (SecAgg+): the coordinator only ever sees the sum of the hospitals' updates.

A study with secure aggregation on runs here instead of :func:`fedrad.server.study.run_study`.
Flower 1.41 wires SecAgg+ only to its legacy workflow API, so this module drives
:class:`flwr.server.workflow.SecAggPlusWorkflow` round by round and keeps everything else of a
fedrad study as it is: the study config sent to every hospital, DP-SGD and the privacy ledger on
each hospital (:mod:`fedrad.client.runtime.secagg_app` reuses :mod:`fedrad.client.runtime.app`), per-round
history, checkpoints, resume, server-side test evaluation, plots and the federated evaluation.

Data flow of one round (``k`` sampled hospitals, ``t`` = reconstruction threshold):

1. *setup* / *share keys*: every hospital makes two key pairs and Shamir-shares (t of n) its
   private-mask seed and its pairwise-mask secret key among its neighbours; the shares travel
   through the coordinator encrypted for their recipients.
2. *collect masked vectors*: each hospital receives the global model, trains under DP with its
   own ledger, computes its **update** ``x_i = local - global`` and sends only
   ``y_i = quantize(r_i * x_i) + PRG(b_i) + sum_j +-PRG(s_ij)  (mod 2**32)`` with
   ``r_i = num_examples_i / max_weight``. The coordinator sees ``y_i``: uniformly random-looking
   integers (checked in ``tests/secagg``).
3. *unmask*: surviving hospitals return shares of the survivors' mask seeds and of the dropped
   hospitals' pairwise secrets; the coordinator removes the masks from ``sum_i y_i`` and obtains
   ``sum_i r_i x_i / sum_i r_i``: the example-weighted mean update of the survivors (FedAvg).
   No hospital's individual update is reconstructible by the coordinator unless ``t`` hospitals
   collude with it.

Numerical error (quantization; see :func:`aggregation_error_bound`): with ``c`` =
``clipping_range``, ``Q`` = ``quantization_range``, ``w`` = ``max_weight``, ``k`` survivors ``i``
with ``n_i`` examples and integer weights ``q_i = round(n_i * Q / w)``, hospital ``i`` sends
``quantize(clip(q_i / Q * x_i, -c, c))``. Every coordinate of the aggregate differs from the exact
example-weighted mean of the survivors' updates by less than ``(2 * c + X) * k / sum_i q_i``, where
``X`` bounds ``|x_i|`` over every coordinate of every survivor and nothing is clipped
(``q_i / Q * |x_i| <= c``): stochastic rounding adds ``< 2c/Q`` per hospital, and rounding the
weights to integers moves the weighted mean by ``<= X * k / sum_i q_i``. The documented form
``3 * c * k / sum_i q_i`` (about ``3 * c * k * w / (Q * sum_i n_i)``) therefore holds when
``|x_i| <= c`` for every coordinate and ``n_i <= w`` (then ``q_i <= Q`` and nothing is clipped).
Merely "not clipped" (``|x_i| <= c * w / n_i``) is *not* enough: a small hospital may then send
coordinates far above ``c`` and the weight rounding alone exceeds ``3 c k / sum q_i`` (see
``tests/secagg/test_secagg_units.py``). Hospitals log a warning when they clip.

Threshold and survivors (see :func:`min_threshold`): each hospital's two secrets (private-mask
seed, pairwise key) are shared ``t`` of ``n`` among its ``n`` neighbours (itself included). In the
unmask stage each neighbour reveals, per hospital, the seed share (told "alive") or the key share
(told "dropped"). A coordinator that lies about dropouts and colludes with one hospital gets that
hospital's share of both secrets plus one kind from each of the ``n - 1`` others, so it can
unmask an individual's update iff ``2 (t - 1) <= n - 1``. fedrad therefore requires
``t >= (n + 3) // 2`` (and ``t >= 3``), and never unmasks a sum of fewer than 3 hospitals (with 2,
either one learns the other's update from the aggregate). Hospitals enforce the same floor
themselves (:mod:`fedrad.client.runtime.secagg_app`): they refuse a setup with a lower threshold and an
unmask request that lists a hospital both as alive and as dropped, lists themselves as dropped,
or names fewer than 3 alive hospitals.

What SecAgg+ does *not* hide from the coordinator: which hospitals took part or dropped out, each
hospital's (DP-released) example count, which is also its weight, its allow-listed train metrics
(epsilon, steps, ...) and audit receipt, and the per-site DP-released evaluation histograms
(evaluation is not aggregated securely). Deployment (``fedrad run``, :mod:`fedrad.server.app`)
runs this same function over the SuperLink; the run folder gets ``secure-aggregation.json``: per
round who was sampled, summed and dropped, and per summed hospital only a summary of its masked
vector (how uniform it looks), never a vector. What to know about Flower
1.41's implementation: masks are drawn by ``numpy.random.RandomState`` from the 32-byte seeds
folded to 32 bits (``secaggplus_utils.pseudo_rand_gen``), so each mask has 32 bits of entropy;
and the protocol is the semi-honest one: there is no consistency round and no PKI for the
SecAgg+ keys, so a coordinator that substitutes public keys in the key-sharing stage can read the
shares; against a *malicious* coordinator SecAgg+ is defence in depth only, and the guarantee is
each hospital's DP-SGD. Each hospital's DP-SGD stays as it is: secure aggregation is defence in
depth, not a reason to train with less noise.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from fedrad.common.config import StudyConfig
from fedrad.common.durable import atomic_write_text
from fedrad.common.errors import ConfigError, FederationError, ProtocolError
from fedrad.common.evaluation import evaluate
from fedrad.common.protocol import ARRAYS_KEY, CONFIG_KEY, ERR_PROTOCOL, METRICS_KEY, check_reply

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .deploy_grid import DelegatingGrid, attribute_superlink_errors
from .history import StudyHistory
from .progress import NullReporter, Reporter
from .study import REFUSALS, SIM_TAG, FedradStrategyMixin, StudyStopped, _Wiring, finish_study, prepare_study

log = logging.getLogger(__name__)

#: The ClientApp every hospital runs for a study with secure aggregation.
SECAGG_CLIENT_APP_REF = "fedrad.client.runtime.secagg_app:app"
#: Train-config key naming the model's arrays (legacy messages carry an unnamed list).
ARRAY_NAMES_KEY = "array-names"
#: Strategies whose aggregation is a weighted mean of the updates: the only ones SecAgg can run
#: (the coordinator never holds an individual update, so median/trimmed mean/Krum are impossible).
SECAGG_STRATEGIES = frozenset({"fedavg", "fedprox"})
#: Fewest masked updates the coordinator ever unmasks the sum of (with 2, each learns the other's).
MIN_SURVIVORS = 3


def min_threshold(num_shares: int) -> int:
    """Smallest reconstruction threshold for secrets shared among ``num_shares`` neighbours.

    A coordinator colluding with one hospital and lying about dropouts collects that hospital's
    share of both secrets of a victim plus one kind of share from each of the ``num_shares - 1``
    others; it unmasks the victim's individual update iff ``2 * (t - 1) <= num_shares - 1``. So
    ``t >= (num_shares + 3) // 2``, and never below :data:`MIN_SURVIVORS`. Must equal
    :func:`fedrad.client.runtime.secagg_app.min_threshold` (hospitals enforce it too).
    """
    return max(MIN_SURVIVORS, (int(num_shares) + 3) // 2)


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters of a study (the proposed ``secure_aggregation`` config block).

    ``num_shares``: neighbours each hospital shares its secrets with (itself included); None =
    every hospital sampled in the round (the complete graph, SecAgg). ``reconstruction_threshold``:
    shares needed to reconstruct a secret; None = :func:`min_threshold` of ``num_shares`` (a lower
    one is refused; a higher one tolerates fewer dropouts). A round
    survives up to ``num_shares - reconstruction_threshold`` dropouts among a hospital's
    neighbours. ``clipping_range``: bound on ``|r_i * x_i|`` for each coordinate of a weighted
    update (larger = fewer clipped coordinates, coarser quantization). ``quantization_range``:
    quantization levels (``Q``). ``modulus_range``: arithmetic modulus (``2**32``: Flower's PRG
    draws masks below it). ``max_weight``: the example count that maps to weight 1; set it to at
    least the largest hospital's training-set size.
    """

    enabled: bool = True
    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 10_000.0

    @classmethod
    def from_study(cls, study: StudyConfig, **overrides: Any) -> SecAggSettings:
        """The study's ``secure_aggregation`` block (once the schema has it), then ``overrides``."""
        block = getattr(study, "secure_aggregation", None)
        base: dict[str, Any] = block.model_dump() if block is not None else {}
        base.update(overrides)
        return cls(**{k: v for k, v in base.items() if k in cls.__dataclass_fields__})

    def check(self, study: StudyConfig) -> None:
        """Raise :class:`ConfigError` (every problem at once) unless these settings can run ``study``."""
        n = study.federation.num_hospitals
        problems: list[str] = []
        if n < 3:
            problems.append(f"federation.num_hospitals: secure aggregation needs at least 3 hospitals (got {n}); "
                            "with 2, each could subtract its own update from the aggregate")
        if study.strategy.name not in SECAGG_STRATEGIES:
            problems.append(f"strategy.name: {study.strategy.name!r} cannot run under secure aggregation "
                            f"(the coordinator only sees a sum; allowed: {sorted(SECAGG_STRATEGIES)})")
        if self.num_shares is not None and not 3 <= self.num_shares <= n:
            problems.append(f"secure_aggregation.num_shares: must be in 3..{n} (got {self.num_shares})")
        shares = self.num_shares or n
        t = self.reconstruction_threshold
        if t is not None and not min_threshold(shares) <= t <= shares:
            problems.append(f"secure_aggregation.reconstruction_threshold: with num_shares={shares} it must be in "
                            f"{min_threshold(shares)}..{shares} (got {t}); a lower one lets the coordinator and one "
                            "colluding hospital unmask an individual hospital's update")
        if not self.clipping_range > 0:
            problems.append(f"secure_aggregation.clipping_range: must be > 0 (got {self.clipping_range})")
        if not isinstance(self.quantization_range, int) or self.quantization_range < 2:
            problems.append(f"secure_aggregation.quantization_range: must be an integer >= 2 "
                            f"(got {self.quantization_range!r})")
        m = self.modulus_range
        if not isinstance(m, int) or m > 2**32 or m.bit_count() != 1:
            problems.append(f"secure_aggregation.modulus_range: must be a power of 2 <= 2**32 (got {m!r})")
        elif isinstance(self.quantization_range, int) and n * (self.quantization_range + 1) >= m:
            problems.append(f"secure_aggregation.quantization_range: {n} hospitals x {self.quantization_range} "
                            f"levels overflow modulus_range={m}; lower quantization_range")
        if not self.max_weight > 0:
            problems.append(f"secure_aggregation.max_weight: must be > 0 (got {self.max_weight})")
        if study.federation.min_hospitals > n:
            problems.append("federation.min_hospitals exceeds num_hospitals")
        if problems:
            raise ConfigError("<study>", problems)

    def shares_for(self, sampled: int) -> tuple[int, int]:
        """(num_shares, threshold) for a round with ``sampled`` hospitals."""
        if sampled < 3:
            raise FederationError(f"secure aggregation needs at least 3 hospitals in a round, {sampled} sampled")
        shares = min(self.num_shares or sampled, sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1  # SecAgg+ neighbourhoods are symmetric: an odd count (Flower does the same)
        floor = min_threshold(shares)
        if floor > shares:  # pragma: no cover - min_threshold(n) <= n for n >= 3
            raise FederationError(f"no safe reconstruction threshold for {shares} shares")
        t = self.reconstruction_threshold or floor
        return shares, min(max(t, floor), shares)


def aggregation_error_bound(num_examples: Iterable[int], *, clipping_range: float, quantization_range: int,
                            max_weight: float, max_abs_update: float | None = None) -> float:
    """Largest per-coordinate difference between the SecAgg+ aggregate and the exact weighted mean.

    Survivor ``i`` (``n_i`` examples, update ``x_i``) gets the integer weight
    ``q_i = round(n_i Q / w)`` and sends ``quantize(clip(q_i / Q * x_i, -c, c))``. Provided nothing
    is clipped (``q_i / Q * |x_i| <= c``) and ``|x_i| <= X`` on every coordinate of every survivor
    (``X`` = ``max_abs_update``): stochastic rounding adds < 1 level (``2c/Q`` in value) per
    hospital to the sum, i.e. ``< 2 c k / sum q_i`` after the division by ``sum q_i / Q``; and
    rounding the weights to integers (``|q_i - n_i Q / w| <= 1/2``) moves the weighted mean by at
    most ``X * k / sum q_i``. Together: ``< (2c + X) k / sum q_i``.

    ``max_abs_update=None`` means ``X = c``: the bound ``3 c k / sum q_i``, valid when every
    coordinate of every update satisfies ``|x_i| <= c`` and ``n_i <= w`` (which also rules out
    clipping). Being unclipped alone (``|x_i| <= c w / n_i``) does not make ``3 c k / sum q_i`` hold.
    """
    ns = [int(n) for n in num_examples]
    q = sum(round(n * quantization_range / max_weight) for n in ns)
    if not ns or q <= 0:
        return float("inf")
    x = clipping_range if max_abs_update is None else float(max_abs_update)
    return (2.0 * clipping_range + x) * len(ns) / q


# ------------------------------------------------------------------------------ what the server sees
@dataclass
class SecAggRound:
    """What the coordinator saw in one SecAgg+ round (for history, logs and tests)."""

    round: int
    sampled: list[int] = field(default_factory=list)
    num_shares: int = 0
    threshold: int = 0
    #: node id -> (stage, error code, reason) of the first failed reply.
    failures: dict[int, tuple[str, int, str]] = field(default_factory=dict)
    #: simulation: node id -> the hospital name a refusal was tagged with ("[hospital-N] ...")
    tagged: dict[int, str] = field(default_factory=dict)
    #: node ids whose masked vector entered the sum.
    survivors: list[int] = field(default_factory=list)
    #: node id -> the masked integer vectors as received (kept only when an observer is set).
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)
    #: node id -> (num_examples, metrics) the hospital reported beside its masked vector.
    reports: dict[int, tuple[int, dict[str, Scalar]]] = field(default_factory=dict)
    #: array name -> the unmasked aggregate update (weighted mean of the survivors' updates).
    aggregate: dict[str, np.ndarray] | None = None
    error_bound: float | None = None
    halted: str = ""
    #: node id -> site name as far as known.
    names: dict[int, str] = field(default_factory=dict)
    #: node id -> the audit-log receipt ({"audit-head", "audit-count"}) beside its masked vector.
    receipts: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: node id -> summary of the masked vector received (how random it looks; kept for every round).
    masked_stats: dict[int, dict[str, float]] = field(default_factory=dict)


#: Called after every round with what the coordinator saw; tests use it, production leaves it None.
RoundObserver = Callable[[SecAggRound], None]


#: Records a masked-vector reply may hold: Flower's legacy FitRes records (the parameters record
#: emptied by ``secaggplus_mod``), the SecAgg+ record and the node's audit receipt.
FITRES_RECORDS = frozenset({"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"})
RECEIPT_KEY = "receipt"
MASKED_REPLY_RECORDS = FITRES_RECORDS | {RECORD_KEY_CONFIGS, RECEIPT_KEY}


def check_masked_reply(content: RecordDict, *, shapes: list[tuple[int, ...]], modulus: int) -> list[np.ndarray]:
    """The masked vectors of a collect-masked-vectors reply; :class:`ProtocolError` unless the
    reply is exactly what the contract allows (masked integers of the model's shapes, the train
    metrics of the allow-list, the receipt)."""
    extra = sorted(set(content.keys()) - MASKED_REPLY_RECORDS)
    missing = sorted((FITRES_RECORDS | {RECORD_KEY_CONFIGS}) - set(content.keys()))
    if extra or missing:
        raise ProtocolError(f"masked reply: unexpected records {extra}, missing {missing}")
    configs = content.config_records[RECORD_KEY_CONFIGS]
    raw = configs.get(Key.MASKED_PARAMETERS)
    if set(configs.keys()) != {Key.MASKED_PARAMETERS} or not isinstance(raw, list) \
            or not all(isinstance(b, bytes) for b in raw):
        raise ProtocolError(f"masked reply: {RECORD_KEY_CONFIGS!r} must hold only the masked vectors")
    want = [(1,), *shapes]  # the weight q_i first (factor_combine), then the model's arrays
    try:
        vectors = [bytes_to_ndarray(cast(bytes, b)) for b in raw]
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is a protocol violation
        raise ProtocolError(f"masked reply: undecodable masked vector ({type(exc).__name__})") from None
    if [tuple(v.shape) for v in vectors] != want:
        raise ProtocolError("masked reply: masked vectors do not have the model's shapes")
    for v in vectors:
        if v.dtype.kind not in "iu" or (v.size and (int(v.min()) < 0 or int(v.max()) >= modulus)):
            raise ProtocolError("masked reply: masked vectors must be integers in [0, modulus_range)")
    if len(content.array_records["fitres.parameters"]) != 0:
        raise ProtocolError("masked reply: carries unmasked arrays")
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
        metrics = MetricRecord(dict(fitres.metrics))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"masked reply: malformed train record ({exc})") from None
    if metrics.get("num-examples") != fitres.num_examples:
        raise ProtocolError("masked reply: num_examples differs from its metric 'num-examples'")
    if RECEIPT_KEY in content:
        check_receipt(content[RECEIPT_KEY])
    # the update itself travels masked (it is checked when unmasked); here the rest of the reply
    check_reply(RecordDict({ARRAYS_KEY: ArrayRecord(), METRICS_KEY: metrics}), kind="train", expected_shapes={})
    return vectors


def check_receipt(record: object) -> dict[str, Any]:
    """The receipt (contract: ConfigRecord {"audit-head": 64 lowercase hex, "audit-count": int >= 1})."""
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {"audit-head", "audit-count"}:
        raise ProtocolError("receipt must be a ConfigRecord holding exactly 'audit-head' and 'audit-count'")
    head, count = record["audit-head"], record["audit-count"]
    if not isinstance(head, str) or len(head) != 64 or any(ch not in "0123456789abcdef" for ch in head):
        raise ProtocolError("receipt: 'audit-head' must be 64 lowercase hex characters")
    if type(count) is not int or count < 1:
        raise ProtocolError("receipt: 'audit-count' must be an integer >= 1")
    return {"audit-head": head, "audit-count": count}


def masked_stats(vectors: list[np.ndarray], *, quantization_range: int, modulus: int) -> dict[str, float]:
    """How random a masked vector looks (the weight entry left out): an unmasked quantized update
    lies in ``[0, Q]``, a masked one spreads uniformly over ``[0, modulus)``."""
    flat = np.concatenate([np.ravel(v) for v in vectors[1:]]).astype(np.float64) if len(vectors) > 1 else np.zeros(0)
    if not flat.size:
        return {"values": 0.0}
    return {"values": float(flat.size), "share_above_quantization_range": float(np.mean(flat > quantization_range)),
            "mean_over_modulus": float(np.mean(flat) / modulus)}


class _RecordingGrid(DelegatingGrid):
    """Passes everything to ``inner``; notes each reply of one SecAgg+ stage in ``record``.

    In the masked-vector stage every reply is checked (:func:`check_masked_reply`) before Flower's
    workflow sees it: a malformed one becomes an error reply, i.e. a dropout (its pairwise masks
    are then removed with the other hospitals' shares; its private mask never is).
    """

    def __init__(self, inner: Grid, record: SecAggRound, stage: str, keep_masked: bool,
                 shapes: list[tuple[int, ...]], settings: SecAggSettings) -> None:
        super().__init__(inner)
        self._record = record
        self._stage = stage
        self._keep_masked = keep_masked
        self._shapes = shapes
        self._settings = settings

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        # ids are set on the requests when pushed; a SuperLink-made error is filed under its hospital
        replies = attribute_superlink_errors(
            replies, {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id})
        answered = set()
        for i, msg in enumerate(replies):
            node = msg.metadata.src_node_id
            answered.add(node)
            if not msg.has_error() and self._stage == "collect_masked_vectors":
                msg = replies[i] = self._screen_masked(msg)
            if msg.has_error():
                tag = SIM_TAG.match(msg.error.reason or "")
                if tag is not None:  # a simulated hospital names itself in a refusal (deployment: never)
                    self._record.tagged.setdefault(node, tag.group(1))
                self._record.failures.setdefault(
                    node, (self._stage, int(msg.error.code),
                           SIM_TAG.sub("", msg.error.reason or "", count=1) or f"error code {msg.error.code}"))
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                self._record.failures.setdefault(node, (self._stage, -1, f"no reply within {timeout} s"))
        return replies

    def _screen_masked(self, msg: Message) -> Message:
        node = msg.metadata.src_node_id
        try:
            vectors = check_masked_reply(msg.content, shapes=self._shapes, modulus=self._settings.modulus_range)
        except ProtocolError as exc:
            log.warning("round %d: masked reply of node %d dropped: %s", self._record.round, node, exc)
            # the same reply (sender, ids), its content replaced by an error: a dropout for the workflow
            return Message(error=Error(code=ERR_PROTOCOL, reason=f"rejected by the coordinator: {exc}"),
                           metadata=copy.copy(msg.metadata))
        if RECEIPT_KEY in msg.content:
            self._record.receipts[node] = check_receipt(msg.content[RECEIPT_KEY])
        self._record.masked_stats[node] = masked_stats(vectors, quantization_range=self._settings.quantization_range,
                                                       modulus=self._settings.modulus_range)
        if self._keep_masked:
            self._record.masked[node] = vectors
        return msg


class FedradSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with each stage's replies noted and a floor on survivors.

    Unmasking reveals the sum of the survivors' updates; it is refused (the round keeps the
    global model) when fewer than ``min_survivors`` (never below :data:`MIN_SURVIVORS`) hospitals
    sent a masked vector. ``shapes``: the model's array shapes, in order (masked replies are
    checked against them).
    """

    def __init__(self, settings: SecAggSettings, *, min_survivors: int, timeout: float | None,
                 shapes: list[tuple[int, ...]], keep_masked: bool = False) -> None:
        if min_survivors < MIN_SURVIVORS:
            raise ValueError(f"min_survivors must be >= {MIN_SURVIVORS} (got {min_survivors})")
        super().__init__(
            num_shares=3, reconstruction_threshold=2,  # placeholders; set per round by begin_round
            max_weight=settings.max_weight, clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range, modulus_range=settings.modulus_range, timeout=timeout,
        )
        self.settings = settings
        self.min_survivors = min_survivors
        self.keep_masked = keep_masked
        self.shapes = list(shapes)
        self.record = SecAggRound(round=0)

    def begin_round(self, server_round: int) -> SecAggRound:
        self.record = SecAggRound(round=server_round)
        return self.record

    def skip_round(self, reason: str) -> None:
        """Called by the strategy when the round cannot start (too few hospitals online)."""
        self.record.halted = f"not started: {reason}"
        log.warning("round %d: %s", self.record.round, self.record.halted)

    def set_sample_size(self, sampled: int) -> None:
        """Called by the strategy once it has sampled: fixes this round's share count and threshold."""
        self.num_shares, self.reconstruction_threshold = self.settings.shares_for(sampled)
        self.record.num_shares, self.record.threshold = int(self.num_shares), int(self.reconstruction_threshold)

    def _grid(self, grid: Grid, stage: str) -> Grid:
        return _RecordingGrid(grid, self.record, stage, self.keep_masked, self.shapes, self.settings)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(self._grid(grid, "setup"), context, state)
        self.record.sampled = sorted(state.sampled_node_ids)
        if not ok:
            self.record.halted = self.record.halted or "setup: too few hospitals answered"
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(self._grid(grid, "share_keys"), context, state)
        if not ok:
            self.record.halted = "share keys: too few hospitals answered"
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().collect_masked_vectors_stage(self._grid(grid, "collect_masked_vectors"), context, state)
        self.record.survivors = sorted(state.active_node_ids)
        for proxy, fitres in state.legacy_results:
            self.record.reports[proxy.node_id] = (int(fitres.num_examples), dict(fitres.metrics))
        if not ok:
            self.record.halted = "collect masked vectors: too few hospitals sent an update"
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        floor = max(self.min_survivors, MIN_SURVIVORS, int(state.threshold))
        if len(state.active_node_ids) < floor:
            self.record.halted = (f"only {len(state.active_node_ids)} masked updates (< {floor}: min_hospitals, "
                                  f"the reconstruction threshold and the floor of {MIN_SURVIVORS}); not unmasked")
            log.warning("round %d: %s", self.record.round, self.record.halted)
            return False
        ok = super().unmask_stage(self._grid(grid, "unmask"), context, state)
        if not ok:
            self.record.halted = "unmask: too few key shares to remove the masks"
        return ok


class _SecAggStrategy(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow consults: samples hospitals, receives the aggregate.

    Aggregation itself is done by the workflow (the unmasked weighted mean of the updates);
    :meth:`aggregate_fit` only takes it over, for :func:`run_secagg_study` to apply.
    """

    def __init__(self, *, study: StudyConfig, base_config: dict[str, Scalar],
                 on_sampled: Callable[[int], None], on_skipped: Callable[[str], None]) -> None:
        self.study = study
        self.base_config = base_config
        self.on_sampled = on_sampled
        self.on_skipped = on_skipped
        self.aggregate: list[np.ndarray] | None = None

    def __repr__(self) -> str:
        return "FedradSecAgg+FedAvg"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        fed = self.study.federation
        self.aggregate = None
        available = client_manager.num_available()
        size = max(int(available * fed.fraction_train), fed.min_hospitals, MIN_SURVIVORS)
        # Bounded wait (Flower's own sample() would wait a day): a round short of hospitals is skipped.
        if not client_manager.wait_for(size, timeout=int(max(1.0, min(fed.round_timeout_s, 600.0)))):
            self.on_skipped(f"{client_manager.num_available()} hospitals online, the round needs {size} "
                            f"(min_hospitals={fed.min_hospitals}; secure aggregation never sums fewer than "
                            f"{MIN_SURVIVORS})")
            return []
        clients = client_manager.sample(num_clients=size, min_num_clients=size)
        if not clients:
            return []
        self.on_sampled(len(clients))
        config: dict[str, Scalar] = {**self.base_config, "server-round": server_round}
        return [(c, FitIns(parameters, dict(config))) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:
            # The workflow set every result's parameters to the same unmasked aggregate.
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # run_secagg_study checks and applies the aggregate itself

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Screen(FedradStrategyMixin):
    """fedrad's per-hospital screening of evaluation replies, without a Flower strategy."""

    def __init__(self, wiring: _Wiring) -> None:
        self._fedrad = wiring


# ----------------------------------------------------------------------------------------- the study
def _record_train_round(rec: SecAggRound, *, wiring: _Wiring, n: int) -> list[tuple[str, int, str]]:
    """Per-hospital entries of round ``n`` in the history; returns the refusals/failures."""
    hist = wiring.history.round(n)
    for node, (_num, metrics) in rec.reports.items():
        if "partition-id" in metrics and isinstance(wiring.names, dict):
            wiring.names[node] = f"hospital-{int(cast(int, metrics['partition-id'])) + 1}"
    if isinstance(wiring.names, dict):  # simulation only: a deployment names nodes from its registry
        for node, tagged in rec.tagged.items():
            wiring.names.setdefault(node, tagged)

    def name(node: int) -> str:
        return wiring.names.get(node, f"node-{node}")

    rec.names = {node: name(node) for node in set(rec.sampled) | set(rec.reports)}
    for node, (num, metrics) in rec.reports.items():
        site = hist.site(name(node))
        site["secure_aggregation"] = "masked update" if node in rec.survivors else "not aggregated"
        try:
            # already checked on receipt (check_masked_reply, which dropped bad replies); checked again
            # here because what reaches the history must meet the contract whatever the path
            check_reply(RecordDict({ARRAYS_KEY: ArrayRecord(), METRICS_KEY: MetricRecord(metrics)}),  # type: ignore[arg-type]
                        kind="train", expected_shapes={})
            if node in rec.receipts:
                check_receipt(ConfigRecord(rec.receipts[node]))  # type: ignore[arg-type]
        except ProtocolError as exc:
            # The update is already inside the sum: it cannot be taken out, only flagged.
            site["status"] = f"metrics rejected: {exc}"
            log.warning("round %d: metrics from %s rejected: %s", n, name(node), exc)
            continue
        for key, value in metrics.items():
            if key != "partition-id":
                site["num_examples" if key == "num-examples" else key] = value
        site.setdefault("num_examples", num)
        if node in rec.receipts:
            site[RECEIPT_KEY] = dict(rec.receipts[node])
    problems = []
    for node, (stage, code, reason) in rec.failures.items():
        if node in rec.reports:
            continue  # answered the masked-vector stage; a later failure (unmask) is logged only
        site = hist.site(name(node))
        kind = "refused" if code in REFUSALS else "failed"
        site["status"] = f"{kind}: {reason}" + ("" if kind == "refused" else f" (at SecAgg+ stage {stage})")
        problems.append((name(node), code, reason))
        log.warning("round %d: %s %s at stage %s: %s", n, name(node), kind, stage, reason)
    return problems


def _write_round_record(path: Path, rec: SecAggRound, *, n: int) -> None:
    """Append round ``n`` to the run folder's ``secure-aggregation.json``: what the coordinator saw
    of each hospital (a summary of its masked vector, never a vector) and what it unmasked."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        doc = {"rounds": []}
    doc["rounds"] = [r for r in doc.get("rounds", []) if r.get("round") != n]
    doc["rounds"].append({
        "round": n,
        "sampled": [rec.names.get(nd, f"node-{nd}") for nd in rec.sampled],
        "num_shares": rec.num_shares, "threshold": rec.threshold,
        "summed": [rec.names.get(nd, f"node-{nd}") for nd in rec.survivors],
        "dropped": {rec.names.get(nd, f"node-{nd}"): f"{stage}: {reason}"
                    for nd, (stage, _code, reason) in rec.failures.items() if nd not in rec.survivors},
        "masked_vectors": {rec.names.get(nd, f"node-{nd}"): stats for nd, stats in rec.masked_stats.items()},
        "unmasked": "the weighted mean of the summed hospitals' updates" if rec.aggregate is not None else "nothing",
        "error_bound": rec.error_bound, "halted": rec.halted,
    })
    doc["rounds"].sort(key=lambda r: int(r["round"]))
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))


def _merge_node_names(n: int, wiring: _Wiring) -> None:
    """A hospital that refused before naming itself is filed as ``node-<id>``; file it under its
    name once a later reply (e.g. its evaluation) has named it."""
    hospitals = wiring.history.round(n).hospitals
    for node, name in wiring.names.items():
        entry = hospitals.pop(f"node-{node}", None)
        if entry is not None:
            hospitals[name] = {**hospitals.get(name, {}), **entry}


def _apply(model: torch.nn.Module, names: list[str], aggregate: list[np.ndarray]) -> str | None:
    """Add the aggregate update to ``model``; returns why not if it does not fit."""
    state = model.state_dict()
    if len(aggregate) != len(names):
        return f"aggregate has {len(aggregate)} arrays, the model {len(names)}"
    new = {}
    for name, delta in zip(names, aggregate):
        cur = state[name]
        if tuple(delta.shape) != tuple(cur.shape):
            return f"aggregate array {name!r} has shape {tuple(delta.shape)}, the model {tuple(cur.shape)}"
        if not np.all(np.isfinite(delta)):
            return f"aggregate array {name!r} is not finite"
        upd = cur.double() + torch.from_numpy(np.asarray(delta, dtype=np.float64))
        new[name] = upd.round().to(cur.dtype) if not cur.is_floating_point() else upd.to(cur.dtype)
    model.load_state_dict(new)
    return None


def _federated_evaluate(grid: Grid, *, study: StudyConfig, model: torch.nn.Module, config: dict[str, Any],
                        server_round: int, screen: _Screen) -> None:
    fed = study.federation
    if fed.fraction_evaluate <= 0:
        return
    all_nodes = list(grid.get_node_ids())
    size = max(int(len(all_nodes) * fed.fraction_evaluate), fed.min_hospitals)
    if len(all_nodes) < size:  # Flower's sample_nodes would wait for them without end
        screen._fedrad.history.event(f"round {server_round + screen._fedrad.round_offset}: federated evaluation "
                                     f"skipped ({len(all_nodes)} hospitals online, {size} needed)")
        return
    node_ids = random.sample(all_nodes, size)
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()),
                          CONFIG_KEY: ConfigRecord({**config, "server-round": server_round})})
    msgs = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=nid, group_id=str(server_round))
            for nid in node_ids]
    replies = grid.send_and_receive(msgs, timeout=fed.round_timeout_s)
    screen.aggregate_evaluate(server_round, replies)


def run_secagg_study(
    grid: Grid,
    *,
    study: StudyConfig,
    run_dir: Path,
    context: Context,
    reporter: Reporter | None = None,
    extra_config: dict[str, Any] | None = None,
    settings: SecAggSettings | None = None,
    observer: RoundObserver | None = None,
) -> StudyHistory:
    """Run (or resume) ``study`` under SecAgg+ with its outputs in ``run_dir``; returns the history.

    ``context`` is the ServerApp's context (the legacy workflow needs it). ``settings`` default
    to the study's ``secure_aggregation`` block. ``observer`` (tests) is called after each round
    with what the coordinator saw, masked vectors included.
    """
    settings = settings or SecAggSettings.from_study(study)
    settings.check(study)
    reporter = reporter or NullReporter()
    fed = study.federation
    prep = prepare_study(study=study, run_dir=run_dir, reporter=reporter)
    model, class_names, test, study_dict, study_id = prep.model, prep.class_names, prep.test, prep.study_dict, prep.study_id
    ckpt_dir, offset, history, device, wiring = prep.ckpt_dir, prep.offset, prep.history, prep.device, prep.wiring
    names = list(model.state_dict().keys())
    screen = _Screen(wiring)
    config: dict[str, Any] = {"study": study.to_json(), "study-id": study_id, "total-rounds": fed.rounds,
                              "round-offset": offset, ARRAY_NAMES_KEY: json.dumps(names), **(extra_config or {})}

    def central_evaluate(n: int, t_round: float) -> None:
        if n == offset and offset:
            return  # resuming: the initial test result is already in the history
        metrics: dict[str, Any] = {}
        if test is not None:
            ev = evaluate(model, test, device=device, batch_size=study.training.eval_batch_size)
            metrics = {"loss": ev.loss, **ev.summary.as_dict(), "num_examples": ev.num_examples}
        if n == offset:
            history.initial_test = metrics
            history.save()
            return
        rec = history.round(n)
        rec.global_test = metrics
        rec.seconds = time.perf_counter() - t_round
        history.check_stop()  # no checkpoint of a round metrics.json will not record
        if n % study.output.checkpoint_every == 0 or n == fed.rounds:
            save_checkpoint(ckpt_dir / f"round-{n:04d}.pt", state_dict=model.state_dict(), study=study_dict,
                            round=n, class_names=class_names, extra={"study_id": study_id})
        history.save()
        reporter.round_finished(rec, history)

    workflow = FedradSecAggPlusWorkflow(settings, min_survivors=max(fed.min_hospitals, MIN_SURVIVORS),
                                        timeout=fed.round_timeout_s, keep_masked=observer is not None,
                                        shapes=[tuple(v.shape) for v in model.state_dict().values()])
    strategy = _SecAggStrategy(study=study, base_config=config, on_sampled=workflow.set_sample_size,
                               on_skipped=workflow.skip_round)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=fed.rounds - offset, round_timeout=fed.round_timeout_s),
                           strategy=strategy, client_manager=SimpleClientManager())
    reporter.study_started(name=fed.name, first_round=offset + 1, total_rounds=fed.rounds, hospitals=fed.num_hospitals)
    central_evaluate(offset, time.perf_counter())
    shares, threshold = settings.shares_for(max(fed.num_hospitals, MIN_SURVIVORS))
    history.event(f"secure aggregation (SecAgg+): clipping_range={settings.clipping_range:g}, "
                  f"quantization_range={settings.quantization_range}, max_weight={settings.max_weight:g}; "
                  f"with all {fed.num_hospitals} hospitals sampled: {shares} shares, threshold {threshold}, "
                  f"{shares - threshold} dropout(s) tolerated; never fewer than {MIN_SURVIVORS} updates unmasked")
    thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        c_done.wait()
        cfg = ConfigRecord({WorkflowKey.START_TIME: time.time()})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        for r in range(1, fed.rounds - offset + 1):
            n = r + offset
            reporter.round_started(n)
            t_round = time.perf_counter()
            cfg[WorkflowKey.CURRENT_ROUND] = r
            legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(model.state_dict())
            rec = workflow.begin_round(r)
            workflow(grid, legacy)
            problems = _record_train_round(rec, wiring=wiring, n=n)
            hist_rec = history.round(n)
            why_not = "no aggregate" if strategy.aggregate is None else _apply(model, names, strategy.aggregate)
            if why_not is None:
                assert strategy.aggregate is not None
                rec.aggregate = dict(zip(names, strategy.aggregate))
                rec.error_bound = aggregation_error_bound(
                    [rec.reports[nd][0] for nd in rec.survivors if nd in rec.reports],
                    clipping_range=settings.clipping_range, quantization_range=settings.quantization_range,
                    max_weight=settings.max_weight)
                hist_rec.aggregated = True
                history.event(f"round {n}: SecAgg+ summed {len(rec.survivors)} masked updates of "
                              f"{len(rec.sampled)} sampled (threshold {rec.threshold}); "
                              f"quantization error < {rec.error_bound:.3g} per coordinate")
            else:
                reason = rec.halted or why_not
                history.event(f"round {n}: no secure aggregate ({reason}); global model kept")
                log.warning("round %d: no secure aggregate (%s); global model kept", n, reason)
            _write_round_record(run_dir / "secure-aggregation.json", rec, n=n)
            if observer is not None:
                observer(rec)
            if not rec.reports and problems and all(code in REFUSALS for _, code, _ in problems):
                history.event(f"round {n}: every hospital refused (privacy budget or node policy); study ends")
                raise StudyStopped("every hospital refused the round (privacy budget or node policy)")
            _federated_evaluate(grid, study=study, model=model, config=config, server_round=r, screen=screen)
            _merge_node_names(n, wiring)
            central_evaluate(n, t_round)
        history.status = "completed"
    except StudyStopped as stop:
        history.status = f"stopped: {stop}"
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            model.load_state_dict(load_checkpoint(last[1])["state_dict"])
    finally:
        f_stop.set()
        thread.join()
    return finish_study(grid, history=history, model=model, test=test, study=study, run_dir=run_dir,
                        class_names=class_names, reporter=reporter, extra={"secure_aggregation": True})


# ---------------------------------------------------------------------------------------- simulation
def simulate_secagg(
    study: StudyConfig,
    *,
    run_dir: Path,
    reporter: Reporter | None = None,
    settings: SecAggSettings | None = None,
    observer: RoundObserver | None = None,
) -> StudyHistory:
    """:func:`fedrad.server.simulation.simulate` for a study under secure aggregation."""
    from .engine import run_engine

    settings = settings or SecAggSettings.from_study(study)
    settings.check(study)
    run_dir = run_dir.resolve()
    state_dir = run_dir / "sites"
    outcome: dict[str, StudyHistory] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome["history"] = run_secagg_study(
            grid, study=study, run_dir=run_dir, context=context, reporter=reporter,
            extra_config={"sim-state-dir": str(state_dir)}, settings=settings, observer=observer,
        )

    run_engine(server_app, client_app_ref=SECAGG_CLIENT_APP_REF, study=study)
    if "history" not in outcome:
        raise FederationError("the simulated federation ended without a result (see the log above)")
    return outcome["history"]


__all__ = [
    "ARRAY_NAMES_KEY", "SECAGG_CLIENT_APP_REF", "FedradSecAggPlusWorkflow", "RoundObserver", "SecAggRound",
    "SecAggSettings", "aggregation_error_bound", "run_secagg_study", "simulate_secagg",
]
