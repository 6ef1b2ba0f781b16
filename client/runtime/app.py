"""The hospital's Flower ClientApp (message API): local DP training and DP evaluation.

The same app runs in simulation and in deployment. Everything that leaves goes through
:func:`fedrad.common.protocol.check_reply`.

What the node trusts (the threat model): its own configuration and its own ledger, never the
coordinator's message beyond the study it describes and the global weights. So:

* the study's identity is the hash of its content (:func:`fedrad.common.config.study_key`), and
  round and evaluation numbers are the node's own counts from its ledger (``server-round``,
  ``total-rounds``, ``round-offset``, ``study-id`` in the message are only logged when they
  disagree); a study's rounds and evaluations are refused once used up;
* all DP randomness comes from OS entropy (``simulation.reproducible_randomness`` excepted, in
  simulation only; a deployed node refuses a study that sets it);
* a train reply carries the weights and data-independent or DP-released numbers (the training
  set's size only as its DP-released value); an evaluate reply carries only DP-released score
  histograms; each evaluation is charged to the ledger's validation account before release;
* order of checks: the node policy's static rules, the model's fit, the study record (a new study
  beyond ``max_studies``, a study whose turns are used up) refuse before anything is written; the
  one-off size release comes next (charged, stored), then the budget rules and the reservation.
  A budget refusal after the size release leaves it released: its numbers may appear in the
  refusal, and it is never re-drawn;
* every reply, refusal and failure is recorded in the node's audit log, and a reply carries the
  log's head as a receipt;
* a train message may ask the node to evaluate the incoming global model first (``evaluate-first``,
  issue 14): after the round's training is planned and reserved, the node runs exactly its plain
  evaluation (its own evaluation count and allowance, the validation account, OS-entropy noise) on
  the weights it received, before training changes them, and returns the released histograms in
  the train reply under ``val-`` names. Whatever the coordinator asks, the node's allowance and
  budgets bound what it spends. A refused evaluation (budget, allowance) does not stop the
  training: the reply then carries only ``val-refused`` (the fixed refusal code), and the refusal
  is audited. Secure-aggregation train requests never evaluate (their reply leaves masked);
* with ``federation.update_encoding: float16-delta`` the node sends its update as float16
  differences from the global model it received (post-processing of the DP output).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.governance.node_policy import check_request, check_study
from fedrad.client.privacy.budget import check_useful, plan_evaluation, plan_round, reserve_round, study_delta
from fedrad.client.privacy.ledger import PrivacyLedger, StudyRecord, StudyTurn
from fedrad.client.privacy.releases import (
    balanced_class_weights,
    gaussian_histograms,
    histogram_noise_std,
    released_class_counts,
    released_size,
)
from fedrad.client.runtime.gate import require_gate, task_age
from fedrad.client.runtime.site import Site, simulated_site
from fedrad.client.runtime.warm import WARM_TASK_ENV
from fedrad.client.training.train import train_local
from fedrad.common.config import PrivacyConfig, StudyConfig, study_from_json, study_key
from fedrad.common.device import resolve_device
from fedrad.common.errors import BudgetExceededError, DataError, FedradError, PolicyViolation, ProtocolError
from fedrad.common.evaluation import evaluate
from fedrad.common.metrics import HIST_BINS
from fedrad.common.models import build_model
from fedrad.common.packing import is_packed, pack_arrays, unpack_arrays
from fedrad.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERR_BUDGET,
    ERR_POLICY,
    ERR_PROTOCOL,
    ERR_REFUSED,
    EVALUATE_FIRST_KEY,
    METRICS_KEY,
    RECEIPT_KEY,
    check_receipt,
    check_reply,
    update_dtype,
)

log = logging.getLogger(__name__)

app = ClientApp()

#: The study field that makes a simulation's DP randomness reproducible (refused by a deployed node).
REPRODUCIBLE_FIELD = "simulation.reproducible_randomness"


def _request(msg: Message) -> tuple[StudyConfig, dict[str, object]]:
    """The study the coordinator asks for, and the rest of its config record (never trusted for limits)."""
    if CONFIG_KEY not in msg.content:
        raise ProtocolError("message has no 'config' record")
    cfg = msg.content[CONFIG_KEY]
    if "study" not in cfg:
        raise ProtocolError("message config lacks 'study'")
    return study_from_json(str(cfg["study"])), dict(cfg)


def _site(context: Context, study: StudyConfig, cfg: dict[str, object]) -> Site:
    node_cfg = context.node_config
    if "partition-id" in node_cfg:
        state_dir = cfg.get("sim-state-dir")
        if not state_dir:
            raise ProtocolError("simulation message lacks 'sim-state-dir'")
        return simulated_site(
            study,
            partition_id=int(node_cfg["partition-id"]),
            num_partitions=int(node_cfg["num-partitions"]),
            state_dir=Path(str(state_dir)),
        )
    from fedrad.client.runtime.node import deployed_site  # deployment: the node's own configuration decides

    return deployed_site(context, study)


def _model(study: StudyConfig, site: Site, msg: Message) -> torch.nn.Module:
    model = build_model(
        study.model.name,
        in_channels=site.data.channels,
        num_classes=site.data.num_classes,
        image_size=site.data.image_size,
        options=study.model.options,
    )
    if ARRAYS_KEY not in msg.content:
        raise ProtocolError("message has no 'arrays' record (the global model)")
    arrays = msg.content[ARRAYS_KEY]
    if is_packed(arrays):  # one array on the wire: unpacked against the model this node built itself
        dtypes = {k: v.detach().cpu().numpy().dtype for k, v in model.state_dict().items()}
        arrays = unpack_arrays(arrays, shapes=_shapes(model), dtype=dtypes, what="the global model")
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ProtocolError(f"global model does not fit model {study.model.name!r}: {exc}") from None
    return model


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _threads(study: StudyConfig) -> None:
    n = study.training.num_threads or max(1, int(study.federation.client_cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def error_code(exc: Exception) -> int:
    """The ``Error.code`` a refusal for ``exc`` is answered with."""
    if isinstance(exc, BudgetExceededError):
        return ERR_BUDGET
    if isinstance(exc, PolicyViolation):
        return ERR_POLICY
    if isinstance(exc, ProtocolError):
        return ERR_PROTOCOL
    return ERR_REFUSED


def _open_ledger(site: Site, privacy: PrivacyConfig) -> PrivacyLedger:
    epsilon, delta = site.ledger_budget(privacy)
    return PrivacyLedger.open(site.ledger_path, budget_epsilon=epsilon, delta=delta,
                              accountant=site.ledger_accountant(privacy), dataset_id=site.dataset_id)


def _check_randomness(study: StudyConfig, site: Site) -> None:
    """A deployed node never lets the coordinator fix its DP randomness."""
    if study.simulation.reproducible_randomness and site.partition_id is None:
        raise PolicyViolation(REPRODUCIBLE_FIELD, "the study asks for reproducible (seeded) DP randomness; a "
                              "deployed node draws its noise, sampling and augmentation from OS entropy only")


def _seed(study: StudyConfig, site: Site, turn: int, stream: int) -> int | None:
    """None (OS entropy), or in a simulation with the explicit switch a seed from the study's seed,
    the node's own turn number and the partition."""
    if not study.simulation.reproducible_randomness or site.partition_id is None:
        return None
    return (study.federation.seed * 100_003 + turn * 1009 + site.partition_id) * 4 + stream


def _check_classes(site: Site) -> None:
    """Refuse a study whose class names do not cover this site's labels, before anything is read
    into training or spent (else the run fails mid-way with an IndexError). The reason sent names
    no count from the data: it says no more than a failed request would."""
    n = site.data.num_classes
    for split in (site.data.train, site.data.val):
        labels = np.asarray(split.labels)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
            log.warning("%s: the study's %d class_names do not cover the labels of this site's data (max label %d)",
                        site.name, n, int(labels.max()))
            raise DataError(f"the study's data.class_names ({n} names) do not match this site's labels; refused "
                            "before training (see the node's log)")


def _log_claims(cfg: dict[str, object], *, key: str, kind: str, turn: int, planned: int) -> None:
    """The coordinator's own numbers are never used; a disagreement is worth a line in the node's log."""
    try:
        claimed = int(cfg.get("server-round", turn)) + int(cfg.get("round-offset", 0))  # type: ignore[arg-type]
        total = int(cfg.get("total-rounds", planned))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        claimed, total = -1, -1
    sid = str(cfg.get("study-id", key[:16]))
    if claimed != turn or (kind == "train" and total != planned) or not key.startswith(sid):
        log.info("%s request: coordinator says study %s round %s/%s; the node's record says study %s %s %d/%d "
                 "(the node's record is used)", kind, sid[:16], claimed, total, key[:16], kind, turn, planned)


@dataclass
class _Request:
    """What is known about a request so far (for the audit record of a refusal)."""

    site: Site | None = None
    study_id: str = "?"
    round: int = 0
    policy_version: str = ""
    epsilon_before: float | None = None
    stats: dict[str, float] | None = None
    #: A train request's evaluation of the incoming global model (``evaluate-first``), if released.
    evaluation: "_Evaluation | None" = None


@dataclass
class _Evaluation:
    """An evaluation released inside a train reply: audited as its own entry before the train entry."""

    request: _Request
    metrics: dict[str, float | int | list[int]]  # the evaluate reply's metrics (without the ``val-`` prefix)


@dataclass
class _Turn:
    """The node's own view of a study's next round or evaluation."""

    key: str
    number: int
    planned: int
    turn: StudyTurn


def _next_turn(ledger: PrivacyLedger, study: StudyConfig, site: Site, *, key: str, kind: str) -> _Turn:
    """The node's next round (``kind="train"``) or evaluation of the study, from its own record;
    refuses a new study beyond the policy's ``max_studies`` and a study whose turns are used up,
    before anything is written."""
    if ledger.study(key) is None:  # a study begun before the ledger's version 2: its rounds are the node's
        ledger.adopt_legacy(key=key, legacy_id=study.fingerprint()[:16], name=study.federation.name,
                            planned_rounds=study.federation.rounds, planned_evaluations=site.planned_evaluations(study))
    rec: StudyRecord | None = ledger.study(key)
    max_studies = site.policy.max_studies if site.policy is not None else None
    if rec is None and max_studies is not None and len(ledger.studies) >= max_studies:
        raise PolicyViolation("max_studies", f"this dataset already served {len(ledger.studies)} distinct studies, "
                              f"policy allows {max_studies}; a new study is refused")
    planned_rounds = rec.planned_rounds if rec else study.federation.rounds
    # node.yaml may lower the evaluation allowance later; it is never raised past the record
    planned_evals = site.planned_evaluations(study)
    if rec:
        planned_evals = min(rec.planned_evaluations, planned_evals)
    done = (rec.train_rounds if kind == "train" else rec.evaluations) if rec else 0
    planned = planned_rounds if kind == "train" else planned_evals
    if done >= planned:
        what = "rounds" if kind == "train" else "evaluations"
        raise BudgetExceededError(f"study {key[:16]} has had all its {planned} {what} on this node; refused")
    turn = StudyTurn(key=key, name=study.federation.name, kind="train" if kind == "train" else "evaluate",
                     planned_rounds=planned_rounds, planned_evaluations=planned_evals, expect_done=done,
                     max_studies=max_studies)
    return _Turn(key, done + 1, planned, turn)


def _audit_log(site: Site) -> AuditLog:
    """The site's audit log, keyed by the site's audit key (node.yaml ``audit.key_file``)."""
    return AuditLog(site.audit_path, key_file=site.audit_key_file)


def _audit(req: _Request, *, kind: str, content: RecordDict | None, epsilon_after: float | None, outcome: str) -> Any:
    if req.site is None:
        return None  # the request never got as far as naming a site: nothing of the site's was touched
    return _audit_log(req.site).append(
        study=req.study_id, round=req.round, kind=kind, content=content, epsilon_before=req.epsilon_before,
        epsilon_after=epsilon_after, policy_version=req.policy_version, outcome=outcome,
    )


def _refusal(kind: str, req: _Request, msg: Message, *, code: int, reason: str, outcome: str) -> Message:
    try:
        _audit(req, kind=kind, content=None, epsilon_after=req.epsilon_before, outcome=outcome)
    except Exception:  # noqa: BLE001 - the refusal still goes out; the log says why it is not audited
        log.exception("%s refusal could not be recorded in the audit log", kind)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def simulated_name(context: Context) -> str | None:
    """``hospital-N`` of a simulated hospital (its partition id), None for a deployed node."""
    pid = context.node_config.get("partition-id")
    return f"hospital-{int(pid) + 1}" if isinstance(pid, int) and not isinstance(pid, bool) else None


def _handle(kind: str, body: Callable[[Message, Context, _Request], Message], msg: Message, context: Context) -> Message:
    req = _Request()
    started = time.monotonic()
    # A simulated hospital names itself in a refusal (the coordinator's records would otherwise only know
    # its random node id); a deployed node is named by the key it authenticated with, never by its reply.
    sim = simulated_name(context)
    tag = f"[{sim}] " if sim else ""
    try:
        reply = body(msg, context, req)
    except FedradError as exc:
        log.warning("%s request refused: %s", kind, exc)
        return _refusal(kind, req, msg, code=error_code(exc), reason=f"{tag}{type(exc).__name__}: {exc}",
                        outcome=f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001 - a node-side failure is audited and answered, never a silent crash
        log.exception("%s request failed on the node", kind)
        return _refusal(kind, req, msg, code=ERR_REFUSED, outcome=f"failed: {type(exc).__name__}",
                        reason=f"{tag}{type(exc).__name__}: the node failed on this request (see the node's log)")
    metrics = reply.content[METRICS_KEY]
    try:
        packed = _packed_like(msg, reply)  # the audit below records the arrays; the packed form leaves
    except Exception as exc:  # noqa: BLE001 - answered as a refusal, never a silent crash
        log.exception("%s reply could not be packed", kind)
        return _refusal(kind, req, msg, code=ERR_REFUSED, outcome=f"failed: {type(exc).__name__}",
                        reason=f"{tag}{type(exc).__name__}: the node could not pack its reply (see the node's log)")
    try:
        if req.evaluation is not None:  # the evaluation inside a train reply: its own entry, first
            ev = req.evaluation
            _audit(ev.request, kind="evaluate", content=RecordDict({METRICS_KEY: MetricRecord(ev.metrics)}),  # type: ignore[arg-type]
                   epsilon_after=ev.metrics.get("epsilon"), outcome="sent (in the train reply)")  # type: ignore[arg-type]
        head = _audit(req, kind=kind, content=reply.content, epsilon_after=metrics.get("epsilon"),  # type: ignore[arg-type]
                      outcome="sent")
    except Exception as exc:  # noqa: BLE001 - nothing leaves unaudited
        log.exception("%s reply not sent: the audit log could not record it", kind)
        return Message(Error(code=ERR_REFUSED, reason=f"{type(exc).__name__}: the node could not audit its reply; "
                             "nothing sent"), reply_to=msg)
    if hasattr(head, "head") and hasattr(head, "count"):
        receipt = ConfigRecord({"audit-head": str(head.head), "audit-count": int(head.count)})
        check_receipt(receipt)
        reply.content[RECEIPT_KEY] = receipt
    if packed is not None:
        reply.content[ARRAYS_KEY] = packed
    age = task_age()
    if age is not None:  # deployment: where a task's time goes (process start and imports vs. the work)
        log.info("%s task (%s start): %.2fs in fedrad (train %.2fs, evaluate %.2fs), %.2fs since the task process "
                 "started", kind, "warm" if os.environ.get(WARM_TASK_ENV) else "cold", time.monotonic() - started,
                 (req.stats or {}).get("seconds", 0.0), (req.stats or {}).get("eval_seconds", 0.0), age)
    return reply


def _packed_like(msg: Message, reply: Message) -> ArrayRecord | None:
    """The reply's arrays packed when the message came packed (:mod:`fedrad.common.packing`); they
    are checked and audited array by array first, then this form leaves. None: sent as they are."""
    if (msg.has_content() and ARRAYS_KEY in msg.content.keys() and is_packed(msg.content[ARRAYS_KEY])
            and reply.has_content() and ARRAYS_KEY in reply.content.keys()):
        return pack_arrays(reply.content[ARRAYS_KEY])
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context)


def train_reply(msg: Message, context: Context, *, secure_aggregation: bool = False) -> Message:
    """One round of local (DP) training: the reply, or an ``Error`` reply when the node refuses.

    ``secure_aggregation=True`` only from :mod:`fedrad.client.runtime.secagg_app`, whose reply leaves the
    node masked by SecAgg+.
    """
    return _handle("train", functools.partial(_train, secure_aggregation=secure_aggregation), msg, context)


def _train(msg: Message, context: Context, req: _Request, *, secure_aggregation: bool = False) -> Message:
    study, cfg = _request(msg)
    key = study_key(study)
    req.study_id = key[:16]
    if study.secure_aggregation.enabled and not secure_aggregation:
        raise ProtocolError("the study asks for secure aggregation but this request came without it; "
                            "the update would leave unmasked")
    _threads(study)
    site = req.site = _site(context, study, cfg)
    require_gate(context=context)  # deployment: only behind the node's app-approval gate (no-op in simulation)
    _check_randomness(study, site)
    _check_classes(site)
    policy = site.policy
    req.policy_version = policy.version() if policy else ""
    if policy is not None:  # the hospital's static rules, before anything is read from its data or written
        check_study(policy=policy, study=study, secure_aggregation=secure_aggregation)
    model = _model(study, site, msg)
    priv = study.privacy
    ledger = _open_ledger(site, priv)
    nxt = _next_turn(ledger, study, site, key=key, kind="train")
    req.round = nxt.number
    _log_claims(cfg, key=key, kind="train", turn=nxt.number, planned=nxt.planned)
    metrics: dict[str, float | int] = {"round": nxt.number}
    sigma: float | None = None
    plan = None
    weights: list[float] | None = None
    if priv.enabled:
        req.epsilon_before = ledger.spent()
        size_seed = _seed(study, site, 0, 3)
        n_released = released_size(ledger=ledger, true_size=len(site.data.train), seed=size_seed)
        if study.training.class_weighting == "balanced":  # the once-released noisy class counts (charged)
            counts = released_class_counts(ledger=ledger, labels=np.asarray(site.data.train.labels),
                                           num_classes=site.data.num_classes,
                                           seed=None if size_seed is None else size_seed + 2**40)
            weights = balanced_class_weights(counts=counts)
        sdelta = study_delta(ledger=ledger, privacy=priv)
        plan = plan_round(
            ledger=ledger, privacy=priv, training=study.training, num_examples=n_released,
            server_round=nxt.number, total_rounds=nxt.planned, study_id=key, study_delta=sdelta, site=site.name,
        )
        # a budget that cannot buy useful training is refused here, before any step is reserved
        check_useful(plan, site=site.name, server_round=nxt.number, total_rounds=nxt.planned)
        if policy is not None:  # the hospital's own limits, checked before anything is spent or trained
            check_request(policy=policy, study=study, study_id=key, ledger=ledger, plan=plan,
                          secure_aggregation=secure_aggregation, study_delta=sdelta)
        reservation = reserve_round(ledger=ledger, plan=plan, study_id=key, server_round=nxt.number,
                                    study_budget=priv.epsilon, study_delta=sdelta, turn=nxt.turn)
        sigma = plan.noise_multiplier
        metrics.update({
            "num-examples": n_released, "epsilon": reservation.epsilon_after, "epsilon_budget": reservation.budget,
            "study_epsilon": float(reservation.study_epsilon or 0.0), "study_epsilon_budget": priv.epsilon,
            "delta": ledger.delta, "noise_multiplier": sigma, "max_grad_norm": priv.max_grad_norm,
            "sample_rate": plan.sample_rate,
        })
    else:  # a non-DP study (only where the node policy allows it): nothing here is protected
        if policy is not None:
            check_request(policy=policy, study=study, study_id=key, ledger=None, plan=None,
                          secure_aggregation=secure_aggregation)
        ledger.count_turn(nxt.turn)
        metrics["num-examples"] = len(site.data.train)
    if weights is None and study.training.class_weighting == "balanced":  # a non-DP study: exact counts
        weights = balanced_class_weights(counts=np.bincount(np.asarray(site.data.train.labels, dtype=np.int64),
                                                            minlength=site.data.num_classes).tolist())
    req.stats = {}
    if not secure_aggregation and _asks_evaluation(cfg):  # the incoming global model, before training changes it
        t_eval = time.monotonic()
        metrics.update(_evaluate_inside(study=study, cfg=cfg, site=site, model=model, ledger=ledger, key=key,
                                        req=req, rounds_trained=nxt.number - 1))
        req.stats["eval_seconds"] = time.monotonic() - t_eval
    encoding = "float32" if secure_aggregation else study.federation.update_encoding
    sent_global = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                   if encoding != "float32" else None)
    device = resolve_device(study.training.device)
    stats = train_local(
        model=model,
        split=site.data.train,
        training=study.training,
        augmentation=study.data.augmentation,
        privacy=priv,
        noise_multiplier=sigma,
        device=device,
        seed=_seed(study, site, nxt.number, 0),
        sample_rate=plan.sample_rate if plan else None,
        steps=plan.steps if plan else None,
        expected_batch_size=plan.expected_batch_size if plan else None,
        class_weights=weights,
    )
    req.stats["seconds"] = stats.seconds
    metrics["steps"] = stats.steps
    if site.partition_id is not None:
        metrics["partition-id"] = site.partition_id
    content = RecordDict(
        {ARRAYS_KEY: encode_update(model.cpu().state_dict(), sent_global, encoding=encoding),
         METRICS_KEY: MetricRecord(metrics)}  # type: ignore[arg-type]
    )
    check_reply(content, kind="train", expected_shapes=_shapes(model), num_classes=site.data.num_classes,
                update_encoding=encoding)
    # loss and time stay here, in the node's own log (they are not DP-protected)
    log.info("%s study %s round %d/%d: trained %d steps, loss %.4f, %.2fs", site.name, key[:16], nxt.number,
             nxt.planned, stats.steps, stats.train_loss, stats.seconds)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    return _handle("evaluate", _evaluate, msg, context)


def _evaluate(msg: Message, context: Context, req: _Request) -> Message:
    study, cfg = _request(msg)
    key = study_key(study)
    req.study_id = key[:16]
    _threads(study)
    site = req.site = _site(context, study, cfg)
    require_gate(context=context)  # deployment: only behind the node's app-approval gate (no-op in simulation)
    _check_randomness(study, site)
    _check_classes(site)
    policy = site.policy
    req.policy_version = policy.version() if policy else ""
    if policy is not None:  # a study the hospital would not train for gets nothing from its data either
        check_study(policy=policy, study=study)
    model = _model(study, site, msg)
    ledger = _open_ledger(site, study.privacy)
    metrics = _evaluation(study=study, cfg=cfg, site=site, model=model, ledger=ledger, key=key, req=req)
    if site.partition_id is not None:
        metrics["partition-id"] = site.partition_id
    content = RecordDict({METRICS_KEY: MetricRecord(metrics)})  # type: ignore[arg-type]
    check_reply(content, kind="evaluate", num_classes=site.data.num_classes)
    return Message(content=content, reply_to=msg)


def _asks_evaluation(cfg: dict[str, object]) -> bool:
    """Whether a train message asks for an evaluation first (anything but an explicit True is no)."""
    return cfg.get(EVALUATE_FIRST_KEY) is True


def _evaluate_inside(*, study: StudyConfig, cfg: dict[str, object], site: Site, model: torch.nn.Module,
                     ledger: PrivacyLedger, key: str, req: _Request, rounds_trained: int) -> dict[str, Any]:
    """The evaluation a train message asks for, as ``val-`` metrics of the train reply; a refusal
    (budget, allowance, policy) is audited and becomes ``val-refused`` (its fixed code), and the
    training goes on. ``rounds_trained``: the node's own count of rounds behind the model received."""
    sub = _Request(site=site, study_id=req.study_id, policy_version=req.policy_version)
    claims = dict(cfg)
    try:  # the model received is the previous round's: its evaluation is the coordinator's round - 1
        claims["server-round"] = int(cfg.get("server-round", 1)) - 1  # type: ignore[arg-type]
    except (TypeError, ValueError):
        pass
    try:
        metrics = _evaluation(study=study, cfg=claims, site=site, model=model, ledger=ledger, key=key, req=sub,
                              rounds_trained=rounds_trained)
    except FedradError as exc:
        log.warning("evaluation inside the train request refused (training goes on): %s", exc)
        try:
            _audit(sub, kind="evaluate", content=None, epsilon_after=sub.epsilon_before, outcome=f"refused: {exc}")
        except Exception:  # noqa: BLE001 - the refusal releases nothing; the log says why it is not audited
            log.exception("evaluate refusal could not be recorded in the audit log")
        return {"val-refused": error_code(exc)}
    req.evaluation = _Evaluation(request=sub, metrics=metrics)
    return {f"val-{k}": v for k, v in metrics.items()}


def _evaluation(*, study: StudyConfig, cfg: dict[str, object], site: Site, model: torch.nn.Module,
                ledger: PrivacyLedger, key: str, req: _Request, rounds_trained: int | None = None) -> dict[str, Any]:
    """One DP evaluation of ``model`` on the site's validation split: the node's next evaluation turn
    (its own count and allowance), charged to the validation account before anything is computed;
    returns the evaluate reply's metrics (without ``partition-id``). ``rounds_trained``: the rounds
    behind ``model`` by the node's own count (default: its ledger's rounds trained so far)."""
    policy = site.policy
    priv = study.privacy
    nxt = _next_turn(ledger, study, site, key=key, kind="evaluate")
    req.round = nxt.number
    _log_claims(cfg, key=key, kind="evaluate", turn=nxt.number, planned=nxt.planned)
    metrics: dict[str, float | int | list[int]] = {"round": nxt.number}
    sigma: float | None = None
    if priv.enabled:
        req.epsilon_before = ledger.spent("val")
        sdelta = study_delta(ledger=ledger, privacy=priv)
        rec = ledger.study(key)
        trained = rounds_trained if rounds_trained is not None else (rec.train_rounds if rec else 0)
        plan = plan_evaluation(ledger=ledger, privacy=priv, evaluation=nxt.number, planned_evaluations=nxt.planned,
                               study_id=key, study_delta=sdelta, planned_rounds=nxt.turn.planned_rounds,
                               rounds_trained=trained)
        if policy is not None:
            check_request(policy=policy, study=study, study_id=key, ledger=ledger, plan=plan,
                          secure_aggregation=study.secure_aggregation.enabled, account="val", study_delta=sdelta)
        # charged before anything is computed from the validation data
        reservation = reserve_round(ledger=ledger, plan=plan, study_id=key, server_round=nxt.number,
                                    study_budget=priv.epsilon, account="val", study_delta=sdelta, turn=nxt.turn)
        sigma = plan.noise_multiplier
        metrics.update(epsilon=reservation.epsilon_after, epsilon_budget=reservation.budget)
    else:  # a non-DP study (only where the node policy allows it): exact counts
        if policy is not None:
            check_request(policy=policy, study=study, study_id=key, ledger=None, plan=None,
                          secure_aggregation=study.secure_aggregation.enabled)
        ledger.count_turn(nxt.turn)
    stats = evaluate(model, site.data.val, device=resolve_device(study.training.device),
                     batch_size=study.training.eval_batch_size)
    hist = np.asarray(stats.histograms, dtype=np.int64)
    if stats.num_examples == 0:  # an empty validation set answers like any other (noise only, with DP)
        hist = np.zeros((site.data.num_classes, 2, HIST_BINS), dtype=np.int64)
    noise_std = 0.0
    if sigma is not None:
        hist = gaussian_histograms(hist, noise_multiplier=sigma, seed=_seed(study, site, nxt.number, 1))
        noise_std = histogram_noise_std(noise_multiplier=sigma, num_classes=hist.shape[0])
    metrics["histograms"] = hist.reshape(-1).astype(int).tolist()
    metrics["histogram-noise-std"] = noise_std  # the mechanism's, not the data's (see the protocol)
    # every example counts once in class 0's two slices; noisy counts are signed (issue 10)
    metrics["num-examples"] = max(0, int(hist[0].sum()))
    log.info("%s study %s evaluation %d/%d: %d examples, loss %.4f (sent: histograms only%s)", site.name, key[:16],
             nxt.number, nxt.planned, stats.num_examples, stats.loss, ", DP-noised" if sigma is not None else "")
    return metrics


#: Largest finite float16: a float16 delta beyond it is clipped (post-processing; a DP-SGD step
#: moves no weight that far).
_F16_MAX = float(np.finfo(np.float16).max)


def encode_update(local: dict[str, torch.Tensor], sent_global: dict[str, torch.Tensor] | None, *,
                  encoding: str) -> ArrayRecord:
    """The train reply's arrays: the trained weights ("float32"), or ("float16-delta") the floating
    arrays as float16 differences from the global model the node received (other dtypes as they are)."""
    if encoding == "float32" or sent_global is None:
        return ArrayRecord(local)
    out: dict[str, Array] = {}
    for name, value in local.items():
        want = update_dtype(str(value.detach().cpu().numpy().dtype), encoding)
        if value.is_floating_point():
            delta = (value.detach().cpu().float() - sent_global[name].float()).numpy()
            out[name] = Array(np.clip(delta, -_F16_MAX, _F16_MAX).astype(want))
        else:
            out[name] = Array(value.detach().cpu().numpy())
    return ArrayRecord(out)  # type: ignore[arg-type]
