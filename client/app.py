"""The hospital's Flower ClientApp (message API): local DP training and local evaluation.

The same app runs in simulation and in deployment. Everything that leaves goes through
:func:`fedrad.common.protocol.check_reply`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrad.common.config import PrivacyConfig, StudyConfig, study_from_json
from fedrad.common.device import resolve_device
from fedrad.common.errors import BudgetExceededError, FedradError, PolicyViolation, ProtocolError
from fedrad.common.evaluation import evaluate
from fedrad.common.models import build_model
from fedrad.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERR_BUDGET,
    ERR_POLICY,
    ERR_PROTOCOL,
    ERR_REFUSED,
    METRICS_KEY,
    check_reply,
)

from .audit_log import AuditLog
from .gate import require_gate, task_age
from .ledger import PrivacyLedger
from .node_policy import check_request, check_study
from .privacy import plan_round, reserve_round
from .site import Site, simulated_site
from .train import train_local
from .warm import WARM_TASK_ENV

log = logging.getLogger(__name__)

app = ClientApp()


def _study_and_round(msg: Message) -> tuple[StudyConfig, int, int, str, dict[str, object]]:
    if CONFIG_KEY not in msg.content:
        raise ProtocolError("message has no 'config' record")
    cfg = msg.content[CONFIG_KEY]
    for key in ("study", "server-round", "total-rounds", "study-id"):
        if key not in cfg:
            raise ProtocolError(f"message config lacks {key!r}")
    study = study_from_json(str(cfg["study"]))
    server_round = int(cfg["server-round"]) + int(cfg.get("round-offset", 0))  # type: ignore[arg-type]
    return study, server_round, int(cfg["total-rounds"]), str(cfg["study-id"]), dict(cfg)


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
    from .node import deployed_site  # deployment: the node's own configuration decides

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
    try:
        model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict(), strict=True)
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
    return PrivacyLedger.open(site.ledger_path, budget_epsilon=epsilon, delta=delta, accountant=privacy.accountant,
                              dataset_id=site.dataset_id)


@dataclass
class _Request:
    """What is known about a request so far (for the audit record of a refusal)."""

    site: Site | None = None
    study_id: str = "?"
    round: int = 0
    policy_version: str = ""
    epsilon_before: float | None = None


def _audit(req: _Request, *, kind: str, content: RecordDict | None, epsilon_after: float | None, outcome: str) -> None:
    if req.site is None:
        return  # the request never got as far as naming a site: nothing of the site's was touched
    AuditLog(req.site.audit_path).append(
        study=req.study_id, round=req.round, kind=kind, content=content, epsilon_before=req.epsilon_before,
        epsilon_after=epsilon_after, policy_version=req.policy_version, outcome=outcome,
    )


def _handle(kind: str, body: Callable[[Message, Context, _Request], Message], msg: Message, context: Context) -> Message:
    req = _Request()
    started = time.monotonic()
    try:
        reply = body(msg, context, req)
    except FedradError as exc:
        log.warning("%s request refused: %s", kind, exc)
        _audit(req, kind=kind, content=None, epsilon_after=req.epsilon_before, outcome=f"refused: {exc}")
        return Message(Error(code=error_code(exc), reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
    metrics = reply.content[METRICS_KEY]
    _audit(req, kind=kind, content=reply.content, epsilon_after=metrics.get("epsilon"), outcome="sent")  # type: ignore[arg-type]
    age = task_age()
    if age is not None:  # deployment: where a task's time goes (process start and imports vs. the work)
        log.info("%s task (%s start): %.2fs in fedrad (train %.2fs), %.2fs since the task process started", kind,
                 "warm" if os.environ.get(WARM_TASK_ENV) else "cold", time.monotonic() - started,
                 float(metrics.get("train_seconds", 0.0)), age)  # type: ignore[arg-type]
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context)


def train_reply(msg: Message, context: Context, *, secure_aggregation: bool = False) -> Message:
    """One round of local (DP) training: the reply, or an ``Error`` reply when the node refuses.

    ``secure_aggregation=True`` only from :mod:`fedrad.client.secagg_app`, whose reply leaves the
    node masked by SecAgg+.
    """
    return _handle("train", functools.partial(_train, secure_aggregation=secure_aggregation), msg, context)


def _train(msg: Message, context: Context, req: _Request, *, secure_aggregation: bool = False) -> Message:
    study, server_round, total_rounds, study_id, cfg = _study_and_round(msg)
    req.study_id, req.round = study_id, server_round
    if study.secure_aggregation.enabled and not secure_aggregation:
        raise ProtocolError("the study asks for secure aggregation but this request came without it; "
                            "the update would leave unmasked")
    _threads(study)
    site = req.site = _site(context, study, cfg)
    require_gate(context=context)  # deployment: only behind the node's app-approval gate (no-op in simulation)
    policy = site.policy
    req.policy_version = policy.version() if policy else ""
    model = _model(study, site, msg)
    priv = study.privacy
    metrics: dict[str, float | int] = {"num-examples": len(site.data.train)}
    sigma: float | None = None
    if not priv.enabled and policy is not None:
        check_request(policy=policy, study=study, study_id=study_id, ledger=None, plan=None,
                      secure_aggregation=secure_aggregation)
    if priv.enabled:
        ledger = _open_ledger(site, priv)
        req.epsilon_before = ledger.spent()
        plan = plan_round(
            ledger=ledger, privacy=priv, training=study.training, num_examples=len(site.data.train),
            server_round=server_round, total_rounds=total_rounds, study_id=study_id,
        )
        if policy is not None:  # the hospital's own limits, checked before anything is spent or trained
            check_request(policy=policy, study=study, study_id=study_id, ledger=ledger, plan=plan,
                          secure_aggregation=secure_aggregation)
        reservation = reserve_round(ledger=ledger, plan=plan, study_id=study_id, server_round=server_round,
                                    study_budget=priv.epsilon)
        sigma = plan.noise_multiplier
        metrics.update(
            epsilon=reservation.epsilon_after, epsilon_budget=reservation.budget, delta=priv.delta,
            noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm, sample_rate=plan.sample_rate,
        )
    device = resolve_device(study.training.device)
    stats = train_local(
        model=model,
        split=site.data.train,
        training=study.training,
        augmentation=study.data.augmentation,
        privacy=priv,
        noise_multiplier=sigma,
        device=device,
        seed=study.federation.seed * 100_003 + server_round * 1009 + (site.partition_id or 0),
    )
    metrics.update(train_loss=stats.train_loss, steps=stats.steps, train_seconds=stats.seconds)
    if site.partition_id is not None:
        metrics["partition-id"] = site.partition_id
    content = RecordDict(
        {ARRAYS_KEY: ArrayRecord(model.cpu().state_dict()), METRICS_KEY: MetricRecord(metrics)}
    )
    check_reply(content, kind="train", expected_shapes=_shapes(model))
    log.info("%s round %d: trained %d steps, loss %.4f", site.name, server_round, stats.steps, stats.train_loss)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    return _handle("evaluate", _evaluate, msg, context)


def _evaluate(msg: Message, context: Context, req: _Request) -> Message:
    study, server_round, _total, study_id, cfg = _study_and_round(msg)
    req.study_id, req.round = study_id, server_round
    _threads(study)
    site = req.site = _site(context, study, cfg)
    require_gate(context=context)  # deployment: only behind the node's app-approval gate (no-op in simulation)
    policy = site.policy
    req.policy_version = policy.version() if policy else ""
    if policy is not None:  # a study the hospital would not train for gets no metrics from its data either
        check_study(policy=policy, study=study)
    model = _model(study, site, msg)
    stats = evaluate(model, site.data.val, device=resolve_device(study.training.device),
                     batch_size=study.training.eval_batch_size)
    s = stats.summary
    metrics: dict[str, float | int | list[int]] = {
        "num-examples": stats.num_examples,
        "val_loss": stats.loss,
        # NaN (e.g. the AUC of a one-class validation set) is sent as NaN, never invented.
        "auc": s.auc,
        "accuracy": s.accuracy,
        "sensitivity": s.sensitivity,
        "specificity": s.specificity,
        "f1": s.f1,
        "confusion": stats.confusion.reshape(-1).astype(int).tolist(),
        "histograms": stats.histograms.reshape(-1).astype(int).tolist(),
    }
    if study.privacy.enabled and site.ledger_path.exists():
        ledger = _open_ledger(site, study.privacy)
        metrics["epsilon"] = req.epsilon_before = ledger.spent()
        metrics["epsilon_budget"] = ledger.budget
    if site.partition_id is not None:
        metrics["partition-id"] = site.partition_id
    content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
    check_reply(content, kind="evaluate", num_classes=site.data.num_classes)
    return Message(content=content, reply_to=msg)

