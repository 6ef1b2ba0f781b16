"""Run one study on a Flower Grid: the ServerApp's body, shared by simulation and deployment.

Flower's strategy drives the rounds (``Strategy.start``); fedrad adds, through a mixin, what a
hospital federation needs around each aggregation: per-hospital records, checks of every reply
against the wire protocol, refusals kept apart from failures, checkpoints, resume, progress.

Fewer model transfers per round (issue 14): from the second round on, the train message asks the
hospitals to evaluate the model it carries (the previous round's global model) before training
(``evaluate-first``), and the released histograms come back in the train reply. They are booked as
the previous round's validation (pooled and per-site figures, threshold, best model, that round's
test figures); no separate evaluate message is sent for those rounds. Only the final model gets a
plain evaluate message. Each hospital still spends one evaluation per round, as before.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy import Strategy

from fedrad.common.config import StudyConfig
from fedrad.common.datasets import ImageSplit, load_npz, npz_source_path
from fedrad.common.device import resolve_device
from fedrad.common.errors import ConfigError, FederationError, ProtocolError
from fedrad.common.evaluation import evaluate
from fedrad.common.model_card import CARD_KEY, model_card
from fedrad.common.models import build_model
from fedrad.common.packing import is_packed, pack_arrays, unpack_arrays
from fedrad.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERR_BUDGET,
    ERR_POLICY,
    EVALUATE_FIRST_KEY,
    METRICS_KEY,
    check_reply,
    update_dtype,
)

from .best_model import BEST_MODEL, LAST_MODEL, MODEL, BestModel, choose_final, noise_warning
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .governance import write_report
from .history import StudyHistory
from .interrupt import StudyInterrupted
from .plots import write_plots
from .progress import NullReporter, Reporter, notify
from .resume import check_resumable
from .screening import ScreenedReply, all_finite, partition_id, screen_evaluate, screen_train, weighted_total
from .strategies import strategy_class, strategy_kwargs

log = logging.getLogger(__name__)


#: Deliberate refusals by a hospital (as opposed to failures): they can end a study cleanly.
REFUSALS = (ERR_BUDGET, ERR_POLICY)

#: Diagnostics and benchmarks only (``FEDRAD_SEPARATE_EVALUATE=1`` in the ServerApp's environment):
#: the flow before issue 14, one evaluate message after every round. Same evaluations per node.
SEPARATE_EVALUATE = os.environ.get("FEDRAD_SEPARATE_EVALUATE", "") == "1"


#: How a simulated hospital names itself at the start of a refusal's reason (deployment: never trusted).
SIM_TAG = re.compile(r"^\[(hospital-\d{1,6})\] ")


class StudyStopped(Exception):
    """Raised inside the strategy loop to end a study early (e.g. every hospital refused)."""


@dataclass
class _Wiring:
    history: StudyHistory
    reporter: Reporter
    expected_shapes: dict[str, tuple[int, ...]]
    round_offset: int
    min_hospitals: int
    #: node id -> hospital name (simulation: filled from partition ids; deployment: the
    #: coordinator's registry, looked up at each reply so a restarted node keeps its row).
    names: Mapping[int, str]
    num_classes: int
    #: array name -> numpy dtype name of the model's tensor (missing: float32).
    expected_dtypes: dict[str, str] = field(default_factory=dict)
    #: None: the operating threshold maximises Youden's J on pooled validation.
    target_sensitivity: float | None = None
    #: ``federation.update_encoding`` of the study (how train replies carry the update).
    update_encoding: str = "float32"
    #: Evaluate each round's global model inside the next round's train message (issue 14); only the
    #: last round of the run (``last_server_round``) gets a plain evaluate message.
    fold_evaluation: bool = False
    last_server_round: int = 0
    #: Called with (round, the global arrays of that round) once that round's validation is booked
    #: from the next round's train replies (test figures, best model, progress).
    on_validated: Callable[[int, dict[str, np.ndarray]], None] | None = None


def _ok_fields(screened: ScreenedReply, kind: str) -> dict[str, Any]:
    """What the history keeps of an accepted reply (contract fields only, under history names)."""
    m = dict(screened.metrics)
    m.pop("partition-id", None)
    if kind == "train":
        if "round" in m:
            m["node_round"] = m.pop("round")
        return {**m, "num_examples": screened.num_examples}
    out: dict[str, Any] = {"val_reported_examples": screened.num_examples}
    if "round" in m:
        out["node_eval_round"] = m["round"]
    if "epsilon" in m:
        out["val_epsilon"] = m["epsilon"]
    if "epsilon_budget" in m:
        out["val_epsilon_budget"] = m["epsilon_budget"]
    if "histogram-noise-std" in m:
        out["val_noise_std"] = m["histogram-noise-std"]
    return out


def _noise_std_of(metrics: dict[str, Any]) -> float | None:
    """The noise std a screened evaluation states for its counts (None from a node that does not say)."""
    v = metrics.get("histogram-noise-std")
    return float(v) if v is not None else None


def _record_outcome(site: dict[str, Any], kind: str, outcome: str) -> None:
    """File a failed, refused or rejected reply's ``outcome`` in the site's round record.

    ``status`` says what the site's train reply of the round came to (its update used: "ok"). An
    evaluate reply's outcome is ``val_status``, and also ``status`` only where the round has no
    train reply of the site on record (it was not asked to train): a failed evaluation of the final
    model must not make a round the site trained in read as one it did not (seen with a hospital
    restarted mid-study, whose only round after the restart was the last)."""
    if kind == "train":
        site["status"] = outcome
        return
    site["val_status"] = outcome
    if "num_examples" not in site and site.get("status", "ok") == "ok":
        site["status"] = outcome


#: Environment switch: ``0`` sends the global model array by array (as before packing) for comparisons.
PACK_ENV = "FEDRAD_PACKED_MODELS"


def _packed(messages: list[Message], arrays: ArrayRecord) -> list[Message]:
    """The messages with the global model packed into one array (:mod:`fedrad.common.packing`: one
    object on the wire instead of one per array); unchanged when the arrays differ in dtype, or with
    :data:`PACK_ENV` = 0. Nodes answer packed messages with packed replies."""
    if os.environ.get(PACK_ENV, "1") == "0":
        return messages
    packed = pack_arrays(arrays)
    if packed is None:
        return messages
    for m in messages:
        if m.has_content() and ARRAYS_KEY in m.content:
            m.content[ARRAYS_KEY] = packed
    return messages


def _sanitised(msg: Message, screened: ScreenedReply, kind: str, weight_key: str) -> Message:
    """The reply as the aggregation may see it: the checked arrays and the checked weight only
    (every reply then has the same record layout, so Flower's consistency check cannot veto a round)."""
    metrics: dict[str, int | float] = {"num-examples": screened.num_examples}
    if weight_key != "num-examples" and weight_key in screened.metrics:
        metrics[weight_key] = screened.metrics[weight_key]
    records: dict[str, Any] = {METRICS_KEY: MetricRecord(metrics)}  # type: ignore[arg-type]
    if kind == "train":
        records[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in screened.arrays.items()})
    return Message(content=RecordDict(records), metadata=msg.metadata)


def _as_model_dtypes(arrays: ArrayRecord, dtypes: dict[str, str]) -> ArrayRecord:
    """The aggregate in the model's dtypes (server optimisers such as FedAdam compute in float64);
    the global model sent to hospitals is then always what their replies must match."""
    out, changed = {}, False
    for name, arr in arrays.items():
        value = arr.numpy()
        want = np.dtype(dtypes.get(name, "float32"))
        if value.dtype != want:
            value, changed = value.astype(want), True
        out[name] = value
    return ArrayRecord({k: Array(v) for k, v in out.items()}) if changed else arrays


class FedradStrategyMixin:
    """Wraps a Flower strategy's aggregation with fedrad's checks and records."""

    _fedrad: _Wiring

    def _site_name(self, msg: Message) -> str:
        """The hospital's name for people: the coordinator's registry name of the node, else (in
        simulation) ``hospital-N`` from its partition id, else ``node-<id>``. A name once learnt for a
        node id is kept, so a node's refusals and failures land in the same row as its replies."""
        node = msg.metadata.src_node_id
        names = self._fedrad.names
        known = names.get(node)
        if known is not None:
            return known
        # Partition ids name simulated hospitals only. With a registry (deployment) a node is named by the
        # key it authenticated with, never by what its reply claims: a hospital cannot file itself (or its
        # receipts) under another hospital's name.
        if isinstance(names, dict):
            name = None
            if msg.has_error():  # a simulated hospital tags its refusals "[hospital-N] ..."
                m = SIM_TAG.match(msg.error.reason or "")
                name = m.group(1) if m else None
            elif METRICS_KEY in msg.content:
                pid = partition_id(msg.content[METRICS_KEY])
                name = f"hospital-{pid + 1}" if pid is not None else None
            if name is not None:
                names[node] = name
                return name
        return f"node-{node}"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        w = self._fedrad
        n = server_round + w.round_offset
        w.reporter.round_started(n)
        self._t_round = time.perf_counter()
        self._timings: dict[str, float] = {}
        t = time.perf_counter()
        # The coordinator's own copy of what it sends: delta-encoded updates are added to it, and the
        # previous round's validation (evaluated on it) books its test figures and best model from it.
        self._sent_arrays = {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, ConfigRecord(dict(config)), grid))  # type: ignore[misc]
        prev = w.history.rounds.get(n - 1)
        self._asked: set[int] = set()
        self._pending_validation: int | None = None
        if w.fold_evaluation and messages and prev is not None and not prev.pooled:
            messages = self._ask_evaluation(messages, arrays)
            self._pending_validation = n - 1
        self._timings["configure"] = time.perf_counter() - t
        return _packed(messages, arrays)

    def _ask_evaluation(self, messages: list[Message], arrays: ArrayRecord) -> list[Message]:
        """The train messages, a sample of them (``fraction_evaluate``, at least ``min_evaluate_nodes``)
        asking for an evaluation of the model they carry first."""
        fraction = float(getattr(self, "fraction_evaluate", 1.0))
        k = len(messages)
        if fraction < 1.0:
            k = min(k, max(int(getattr(self, "min_evaluate_nodes", 0)), int(len(messages) * fraction)))
        chosen = {m.metadata.dst_node_id for m in random.sample(messages, k)}
        self._asked = chosen
        base = dict(messages[0].content[CONFIG_KEY])
        asking = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**base, EVALUATE_FIRST_KEY: True})})
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            out.append(Message(content=asking, message_type=MessageType.TRAIN, dst_node_id=node) if node in chosen else m)
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        w = self._fedrad
        if w.fold_evaluation and server_round < w.last_server_round:
            return []  # this round's model is evaluated inside the next round's train messages
        return _packed(list(super().configure_evaluate(server_round, arrays, config, grid)), arrays)  # type: ignore[misc]

    def _screen_one(self, msg: Message, kind: str) -> ScreenedReply:
        """Protocol allow-lists (``check_reply``), then the coordinator's value checks. An evaluation
        inside a train reply is screened (and used) only when this coordinator asked that node for one."""
        w = self._fedrad
        if kind == "train" and ARRAYS_KEY in msg.content.keys() and is_packed(msg.content[ARRAYS_KEY]):
            dtypes = {name: update_dtype(str(w.expected_dtypes.get(name, "float32")), w.update_encoding)
                      for name in w.expected_shapes}
            msg.content[ARRAYS_KEY] = unpack_arrays(msg.content[ARRAYS_KEY], shapes=w.expected_shapes, dtype=dtypes,
                                                    what="train reply")
        if kind == "train":
            check_reply(msg.content, kind=kind, expected_shapes=w.expected_shapes, num_classes=w.num_classes,
                        update_encoding=w.update_encoding)
            asked = msg.metadata.src_node_id in getattr(self, "_asked", set())
            return screen_train(msg.content, expected_shapes=w.expected_shapes, expected_dtypes=w.expected_dtypes,
                                update_encoding=w.update_encoding, sent_global=getattr(self, "_sent_arrays", None),
                                num_classes=w.num_classes if asked else None)
        check_reply(msg.content, kind=kind, num_classes=w.num_classes)
        return screen_evaluate(msg.content, num_classes=w.num_classes)

    def _screen(self, server_round: int, replies: Iterable[Message], kind: str) -> tuple[list[Message], list[tuple[str, int, str]]]:
        """Sort ``replies`` into usable ones (returned sanitised, in order) and refusals/failures.

        A rejected reply is recorded in its site's status and in the run's events (hospital and
        field named) and contributes nothing else. An evaluate reply's failure or refusal is the
        site's ``val_status``; it is its ``status`` too only where no train reply of the round is on
        record (:func:`_record_outcome`): it never hides that the site trained in that round."""
        w = self._fedrad
        rec = w.history.round(server_round + w.round_offset)
        valid, refused = [], []
        weight_key = str(getattr(self, "weighted_by_key", "num-examples"))
        for msg in replies:
            name = self._site_name(msg)
            site = rec.site(name)
            if msg.has_error():
                reason = SIM_TAG.sub("", msg.error.reason or "", count=1) or f"error code {msg.error.code}"
                outcome = ("refused: " if msg.error.code in REFUSALS else "failed: ") + reason
                _record_outcome(site, kind, outcome)
                refused.append((name, int(msg.error.code), reason))
                log.warning("round %d %s: %s %s", rec.round, kind, name, outcome)
                if kind != "train":
                    w.history.event(f"round {rec.round}: the evaluation by {name} {outcome}")
                continue
            try:
                screened = self._screen_one(msg, kind)
            except ProtocolError as exc:
                _record_outcome(site, kind, f"rejected{'' if kind == 'train' else ' (evaluate)'}: {exc}")
                w.history.event(f"round {rec.round}: {kind} reply from {name} rejected: {exc}")
                log.warning("round %d %s: reply from %s rejected: %s", rec.round, kind, name, exc)
                continue
            site.update(_ok_fields(screened, kind))
            if kind == "train":
                self._take_evaluation(name, screened, rec.round)
                warning = noise_warning(w.history, rec.round, name)
                if warning:
                    w.history.event(warning)
                    notify(w.reporter, warning)
                    log.warning("%s", warning)
            if screened.receipt is not None:
                rec.record_receipt(name, kind, screened.receipt.as_dict())
            if kind == "evaluate" and screened.histograms is not None:
                self._histograms[name] = screened.histograms
                self._noise_std("evaluate")[name] = _noise_std_of(screened.metrics)
            valid.append(_sanitised(msg, screened, kind, weight_key))
        return valid, refused

    def _take_evaluation(self, name: str, screened: ScreenedReply, n: int) -> None:
        """File the evaluation a train reply carries (of round ``n - 1``'s model) under that round."""
        if screened.evaluation is None and screened.evaluation_refused is None:
            return
        w = self._fedrad
        prev = w.history.round(n - 1)
        if screened.evaluation_refused is not None:
            prev.site(name)["val_status"] = f"evaluation refused (code {screened.evaluation_refused})"
            w.history.event(f"round {n - 1}: {name} refused the evaluation asked in round {n}'s train message "
                            f"(code {screened.evaluation_refused}); it trained")
            return
        ev = screened.evaluation
        prev.site(name).update(_ok_fields(ev, "evaluate"))
        if ev.histograms is not None:
            self._piggyback[name] = ev.histograms
            self._noise_std("train")[name] = _noise_std_of(ev.metrics)

    def _noise_std(self, kind: str) -> dict[str, float | None]:
        """Per site, the noise std its histograms state (``histogram-noise-std``), beside
        :attr:`_histograms` (evaluate) or :attr:`_piggyback` (train)."""
        if not hasattr(self, "_fedrad_noise_std"):
            self._fedrad_noise_std: dict[str, dict[str, float | None]] = {"train": {}, "evaluate": {}}
        return self._fedrad_noise_std[kind]

    @property
    def _piggyback(self) -> dict[str, np.ndarray]:
        """Screened histograms from the current train round's evaluations (of the previous model)."""
        if not hasattr(self, "_fedrad_piggyback"):
            self._fedrad_piggyback: dict[str, np.ndarray] = {}
        return self._fedrad_piggyback

    def _book_validation(self) -> None:
        """Round n - 1's validation from round n's train replies, then its deferred records."""
        m = getattr(self, "_pending_validation", None)
        if m is None:
            return
        w = self._fedrad
        self._pending_validation = None
        w.history.pool_validation(m, dict(self._piggyback), noise_std=dict(self._noise_std("train")),
                                  target_sensitivity=w.target_sensitivity)
        self._piggyback.clear()
        self._noise_std("train").clear()
        if w.on_validated is not None:
            w.on_validated(m, self._sent_arrays)

    @property
    def _histograms(self) -> dict[str, np.ndarray]:
        """The current evaluate round's screened histograms by site (filled by :meth:`_screen`)."""
        if not hasattr(self, "_fedrad_hists"):
            self._fedrad_hists: dict[str, np.ndarray] = {}
        return self._fedrad_hists

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        w = self._fedrad
        replies = list(replies)
        t = time.perf_counter()
        self._piggyback.clear()
        self._noise_std("train").clear()
        valid, refused = self._screen(server_round, replies, "train")
        timings = getattr(self, "_timings", {})
        timings["screen"] = time.perf_counter() - t
        t = time.perf_counter()
        self._book_validation()
        timings["book_validation"] = time.perf_counter() - t
        rec = w.history.round(server_round + w.round_offset)
        if not valid and refused and all(code in REFUSALS for _, code, _ in refused):
            w.history.event(f"round {rec.round}: every hospital refused (privacy budget or node policy); study ends")
            raise StudyStopped("every hospital refused the round (privacy budget or node policy)")
        if len(valid) < w.min_hospitals:
            w.history.event(f"round {rec.round}: {len(valid)} usable updates < min_hospitals={w.min_hospitals}; "
                            "global model kept")
            log.warning("round %d: only %d usable updates (min %d); not aggregating", rec.round, len(valid), w.min_hospitals)
            return None, None
        if weighted_total([float(m.content[METRICS_KEY]["num-examples"]) for m in valid]) is None:
            w.history.event(f"round {rec.round}: aggregation weights do not sum to a positive number; "
                            "global model kept")
            return None, None
        t = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        timings["aggregate"] = time.perf_counter() - t
        if arrays is not None:
            bad = all_finite(arrays)
            if bad is not None:
                w.history.event(f"round {rec.round}: the aggregate's array {bad!r} is not finite; global model kept")
                log.warning("round %d: aggregate array %s not finite; global model kept", rec.round, bad)
                return None, None
            arrays = _as_model_dtypes(arrays, w.expected_dtypes)
        rec.aggregated = arrays is not None
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        w = self._fedrad
        self._histograms.clear()
        self._noise_std("evaluate").clear()
        self._screen(server_round, list(replies), "evaluate")
        n = server_round + w.round_offset
        w.history.pool_validation(n, dict(self._histograms), noise_std=dict(self._noise_std("evaluate")),
                                  target_sensitivity=w.target_sensitivity)
        self._histograms.clear()
        self._noise_std("evaluate").clear()
        pooled = w.history.round(n).pooled
        if not pooled:
            return None
        return MetricRecord({k: float(v) for k, v in pooled.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)})


def make_strategy(study: StudyConfig, wiring: _Wiring) -> Strategy:
    base = strategy_class(study.strategy.name)
    cls = type(f"Fedrad{base.__name__}", (FedradStrategyMixin, base), {})
    strategy = cls(**strategy_kwargs(study, base))
    strategy._fedrad = wiring
    return strategy


def _num_classes_and_test(study: StudyConfig) -> tuple[list[str], ImageSplit | None]:
    data = study.data
    if data.source == "npz":
        splits = load_npz(npz_source_path(data.path), channels=data.channels, image_size=data.image_size)
        test = splits["test"]
        if data.max_test is not None and len(test) > data.max_test:
            rng = np.random.default_rng(study.federation.seed)
            test = test.subset(rng.choice(len(test), size=data.max_test, replace=False))
        k = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
        if data.class_names is not None and len(data.class_names) != k:
            where = str(npz_source_path(data.path))
            raise ConfigError(where, [f"data.class_names: {len(data.class_names)} names {list(data.class_names)} "
                                      f"but the data set {where} has labels 0..{k - 1} ({k} classes)"])
        names = list(data.class_names or [f"class-{i}" for i in range(k)])
        return names, test
    if not data.class_names:
        raise FederationError("data.class_names is required when the coordinator holds no data set")
    return list(data.class_names), None


def check_study_data(study: StudyConfig) -> None:
    """Refuse, before anything is written or started, a study whose ``data.class_names`` do not
    match the coordinator's data set (hospitals check their own data again)."""
    _num_classes_and_test(study)


@dataclass
class PreparedStudy:
    """What both study runners (plain and secure aggregation) start from: model, resume point, history."""

    model: torch.nn.Module
    class_names: list[str]
    test: ImageSplit | None
    study_dict: dict[str, Any]
    study_id: str
    ckpt_dir: Path
    offset: int
    history: StudyHistory
    device: torch.device
    wiring: _Wiring


def prepare_study(*, study: StudyConfig, run_dir: Path, reporter: Reporter,
                  names: Mapping[int, str] | None = None) -> PreparedStudy:
    """Build the initial model, resume from ``run_dir``'s latest checkpoint (same study, operational
    fields aside: see :mod:`fedrad.server.resume`) and open its history.

    A resumed study keeps the study id it started with. ``names`` maps node ids to hospital names
    (deployment: the coordinator's registry); it is looked up at every reply."""
    fed = study.federation
    resumed_id = check_resumable(study, run_dir)  # before anything is written into run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    class_names, test = _num_classes_and_test(study)
    torch.manual_seed(fed.seed)
    model = build_model(study.model.name, in_channels=study.data.channels, num_classes=len(class_names),
                        image_size=study.data.image_size, options=study.model.options)
    study_dict = study.to_dict()
    study_id = resumed_id or study.fingerprint()[:16]
    ckpt_dir = run_dir / "checkpoints"
    offset = 0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        offset, path = latest
        model.load_state_dict(load_checkpoint(path)["state_dict"])
        log.info("resuming after round %d from %s", offset, path.name)
    history = StudyHistory.resume(run_dir / "metrics.json", study=study_dict, study_id=study_id, up_to_round=offset)
    history.status = "running"
    if offset:
        history.event(f"resumed after round {offset}")
    wiring = _Wiring(
        history=history, reporter=reporter, round_offset=offset, min_hospitals=fed.min_hospitals,
        names=names if names is not None else {},
        expected_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()}, num_classes=len(class_names),
        expected_dtypes={k: str(v.detach().cpu().numpy().dtype) for k, v in model.state_dict().items()},
    )
    return PreparedStudy(model, class_names, test, study_dict, study_id, ckpt_dir, offset, history,
                         resolve_device(study.training.device), wiring)


def save_interrupted(history: StudyHistory, *, run_dir: Path, reason: str, lock_held: bool = False) -> StudyHistory:
    """Record a study stopped at a safe point: rounds after the last checkpoint are dropped (a resume
    re-runs them), ``metrics.json`` says ``interrupted``. No model files are written. ``lock_held``:
    see :meth:`StudyHistory.save`."""
    last = latest_checkpoint(run_dir / "checkpoints")
    kept = last[0] if last else 0
    dropped = sorted(n for n in history.rounds if n > kept)
    for n in dropped:
        del history.rounds[n]
    history.status = "interrupted"
    history.event(f"interrupted ({reason}) after round {kept}" + (
        f"; round {dropped[0]} was not finished and is re-run on resume" if dropped else ""))
    history.save(lock_held=lock_held)
    return history


def run_study(
    grid: Grid,
    *,
    study: StudyConfig,
    run_dir: Path,
    reporter: Reporter | None = None,
    extra_config: dict[str, Any] | None = None,
    names: Mapping[int, str] | None = None,
) -> StudyHistory:
    """Run (or resume) ``study`` with its outputs in ``run_dir``; returns the history.

    ``names``: node id -> hospital name (deployment: from the coordinator's registry; a node that
    reconnects with a new id under the same name keeps its row). A :class:`StudyInterrupted` raised by
    the grid (Ctrl-C) ends the study at that point with status ``interrupted``."""
    reporter = reporter or NullReporter()
    fed = study.federation
    prep = prepare_study(study=study, run_dir=run_dir, reporter=reporter, names=names)
    model, class_names, test, study_dict, study_id = prep.model, prep.class_names, prep.test, prep.study_dict, prep.study_id
    ckpt_dir, offset, history, device, wiring = prep.ckpt_dir, prep.offset, prep.history, prep.device, prep.wiring
    wiring.update_encoding = fed.update_encoding
    wiring.fold_evaluation = fed.fraction_evaluate > 0 and not SEPARATE_EVALUATE
    wiring.last_server_round = fed.rounds - offset
    strategy = make_strategy(study, wiring)
    config = ConfigRecord({"study": study.to_json(), "study-id": study_id, "total-rounds": fed.rounds,
                           "round-offset": offset, **(extra_config or {})})
    best = BestModel.resume(run_dir / BEST_MODEL, history=history)
    ckpt_extra = {"study_id": study_id}

    def test_metrics(n: int) -> dict[str, Any]:
        """``model`` on the coordinator's test split, at the latest pooled threshold up to round ``n``."""
        if test is None:
            return {}
        chosen = history.latest_threshold(up_to=n)  # round n's pooled validation is booked by now
        ev = evaluate(model, test, device=device, batch_size=study.training.eval_batch_size,
                      threshold=chosen[1] if chosen else None)
        return ev.test_metrics()

    def validated(n: int) -> dict[str, Any]:
        """What waits for round ``n``'s pooled validation: its test figures and the best model."""
        t = time.perf_counter()
        rec = history.round(n)
        metrics = rec.global_test = test_metrics(n)
        best.offer(n, rec.pooled, state_dict=model.state_dict(), study=study_dict, class_names=class_names,
                   extra=ckpt_extra)
        rec.timings["test_and_best"] = time.perf_counter() - t
        history.save()
        return metrics

    def on_validated(n: int, arrays: dict[str, np.ndarray]) -> None:
        """Round ``n``'s validation arrived in round n + 1's train replies (``arrays``: its model)."""
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        validated(n)
        rec = history.round(n)
        log.info("round %d validation (from round %d's train replies): pooled AUC %s, %d sites", n, n + 1,
                 rec.pooled.get("auc"), int(rec.pooled.get("sites", 0) or 0))
        shown = getattr(reporter, "round_validated", None)  # reporters that can show it late
        if callable(shown):
            shown(rec, history)

    wiring.on_validated = on_validated

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        n = server_round + offset
        if server_round == 0 and offset:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        if server_round == 0:
            history.initial_test = test_metrics(n)
            history.save()
            return None
        rec = history.round(n)
        rec.seconds = time.perf_counter() - getattr(strategy, "_t_round", time.perf_counter())
        rec.timings.update(getattr(strategy, "_timings", {}))
        t = time.perf_counter()
        history.check_stop()  # no checkpoint of a round metrics.json will not record
        if n % study.output.checkpoint_every == 0 or n == fed.rounds:
            save_checkpoint(ckpt_dir / f"round-{n:04d}.pt", state_dict=model.state_dict(), study=study_dict,
                            round=n, class_names=class_names, extra=ckpt_extra)
        rec.timings["checkpoint"] = time.perf_counter() - t
        if wiring.fold_evaluation and server_round < wiring.last_server_round:
            history.save()  # test figures and best model wait for this model's validation (next round's replies)
            reporter.round_finished(rec, history)
            return None
        metrics = validated(n)
        reporter.round_finished(rec, history)
        return MetricRecord({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})

    reporter.study_started(name=fed.name, first_round=offset + 1, total_rounds=fed.rounds, hospitals=fed.num_hospitals)
    final_arrays = ArrayRecord(model.state_dict())
    if offset < fed.rounds:
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=fed.rounds - offset,
                timeout=fed.round_timeout_s,
                train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
                evaluate_fn=evaluate_fn,
            )
            final_arrays = result.arrays if result.arrays is not None else final_arrays
            history.status = "completed"
        except StudyInterrupted as stop:
            reporter.study_finished(history)
            return save_interrupted(history, run_dir=run_dir, reason=str(stop))
        except StudyStopped as stop:
            history.status = f"stopped: {stop}"
            last = latest_checkpoint(ckpt_dir)
            if last is not None:
                final_arrays = ArrayRecord(load_checkpoint(last[1])["state_dict"])
    else:
        history.status = "completed"
    model.load_state_dict(final_arrays.to_torch_state_dict())
    return finish_study(grid, history=history, model=model, test=test, study=study, run_dir=run_dir,
                        class_names=class_names, reporter=reporter, extra={"study_id": study_id})


def _fab_hash(grid: Grid) -> str | None:
    """The hash of the app bundle Flower runs (deployment); None in simulation."""
    try:
        return grid.run.fab_hash or None
    except Exception:  # noqa: BLE001 - simulation grids have no bundle attached
        return None


def finish_study(
    grid: Grid,
    *,
    history: StudyHistory,
    model: torch.nn.Module,
    test: ImageSplit | None,
    study: StudyConfig,
    run_dir: Path,
    class_names: list[str],
    reporter: Reporter,
    extra: dict[str, Any] | None = None,
) -> StudyHistory:
    """Everything a finished (or stopped) study leaves behind: ``last-model.pt`` (``model``'s weights),
    ``best-model.pt`` and ``model.pt`` (the best by pooled validation, see
    :mod:`fedrad.server.best_model`), the final test metrics of ``model.pt``, ``metrics.json``, plots
    and the governance report.

    The operating threshold is the one chosen on pooled validation in the round ``model.pt`` comes
    from (or the latest round before it that had one; Youden's J unless a target sensitivity is set);
    it goes into ``metrics.json`` (``operating_threshold``), ``model.pt`` (``threshold``) and the final
    test metrics."""
    last_round = max(history.rounds, default=0)
    common_extra = {"model": study.model.name, "model_options": dict(study.model.options), **(extra or {})}
    last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    last_thr = history.latest_threshold()
    save_checkpoint(run_dir / LAST_MODEL, state_dict=last_state, study=study.to_dict(), round=last_round,
                    class_names=class_names, extra={**common_extra, "threshold": last_thr[1] if last_thr else None})
    state, choice = choose_final(history, run_dir, last_state=last_state, last_round=last_round)
    if (choice["is"] == "best" or choice.get("best_file")) and choice["round"] == choice["best_round"]:
        best_path = run_dir / BEST_MODEL
        if not best_path.is_file() or int(load_checkpoint(best_path).get("round", -1)) != choice["round"]:
            save_checkpoint(best_path, state_dict=state, study=study.to_dict(), round=choice["round"],
                            class_names=class_names, extra=common_extra)
    model.load_state_dict(state)
    history.model_choice = choice
    chosen = history.latest_threshold(up_to=choice["round"])
    threshold = chosen[1] if chosen else None
    history.operating_threshold = {
        "value": threshold, "round": chosen[0] if chosen else None,
        "rule": history.rounds[chosen[0]].pooled.get("rule", "youden") if chosen else None,
        "chosen_on": "pooled validation (DP histograms)" if chosen else "none: no pooled validation with both classes",
    }
    if chosen is not None and chosen[0] != choice["round"]:
        history.event(f"operating threshold from round {chosen[0]}: round {choice['round']} had no usable "
                      "pooled validation")
    if choice["is"] == "best":
        history.event(f"{MODEL} is {choice['note']}")
    if test is not None:
        ev = evaluate(model, test, device=resolve_device(study.training.device),
                      batch_size=study.training.eval_batch_size, threshold=threshold)
        history.final_test = ev.test_metrics()
    card = model_card(study_dict=study.to_dict(), class_names=class_names, threshold=threshold,
                      state_dict=model.state_dict(), study_id=history.study_id)
    save_checkpoint(run_dir / MODEL, state_dict=model.state_dict(), study=study.to_dict(),
                    round=choice["round"], class_names=class_names,
                    extra={**common_extra, "threshold": threshold, "selected": choice["is"], CARD_KEY: card})
    history.save()
    write_plots(history, run_dir)
    write_report(history=history, run_dir=run_dir, study=study, fab_hash=_fab_hash(grid))
    try:  # the study report a person opens (fedrad report RUN_DIR rebuilds it)
        from .report_html import build_report

        build_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the study's results are already saved
        log.warning("report.html not written (%s); run `fedrad report %s`", exc, run_dir)
    reporter.study_finished(history)
    return history
