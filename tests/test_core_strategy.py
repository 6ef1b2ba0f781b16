"""The coordinator's strategy mixin (server/study.py) and strategy registry (server/strategies.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedrad.common.config import parse_study
from fedrad.common.errors import StrategyError
from fedrad.common.metrics import HIST_BINS, pooled_summary, score_histograms
from fedrad.common.protocol import ERR_BUDGET, ERR_REFUSED
from fedrad.server.history import StudyHistory
from fedrad.server.progress import NullReporter
from fedrad.server.strategies import STRATEGIES, strategy_class, strategy_kwargs
from fedrad.server.study import StudyStopped, _Wiring, make_strategy

SHAPES = {"w": (2, 3), "b": (2,)}


def _wiring(tmp_path: Path, *, min_hospitals: int = 1, offset: int = 0) -> _Wiring:
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="sid")
    return _Wiring(history=history, reporter=NullReporter(), expected_shapes=dict(SHAPES), round_offset=offset,
                   min_hospitals=min_hospitals, names={}, num_classes=2)


def _strategy(tmp_path: Path, **kw):
    study = parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}})
    return make_strategy(study, _wiring(tmp_path, **kw))


def _md(node: int, kind: str = MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"r{node}-{time.time_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="q", group_id="1", created_at=time.time(), ttl=DEFAULT_TTL,
                    message_type=kind)


def _train_reply(node: int, partition: int, value: float, n: int = 10, **extra) -> Message:
    arrays = ArrayRecord({"w": torch.full((2, 3), value), "b": torch.full((2,), value)})
    metrics = MetricRecord({"num-examples": n, "epsilon": 1.0 + partition, "partition-id": partition, **extra})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), metadata=_md(node))


def _refusal(node: int, code: int = ERR_BUDGET) -> Message:
    return Message(error=Error(code=code, reason="BudgetExceededError: over budget"), metadata=_md(node))


def test_mixin_records_statuses_and_aggregates_only_valid_replies(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    valid = _train_reply(11, partition=0, value=1.0)
    refused = _refusal(12)
    malformed = _train_reply(13, partition=2, value=1000.0, patient_id=42)

    arrays, metrics = strat.aggregate_train(1, [valid, refused, malformed])

    rec = strat._fedrad.history.round(1)
    assert rec.hospitals["hospital-1"]["status"] == "ok"
    assert rec.hospitals["hospital-1"]["num_examples"] == 10
    assert rec.hospitals["hospital-1"]["epsilon"] == 1.0
    assert rec.hospitals["node-12"]["status"].startswith("refused: ")
    assert rec.hospitals["hospital-3"]["status"].startswith("rejected: ")
    assert "patient_id" in rec.hospitals["hospital-3"]["status"]
    assert "num_examples" not in rec.hospitals["hospital-3"]  # nothing from a rejected reply is kept
    assert any("hospital-3" in e and "patient_id" in e for e in strat._fedrad.history.events)
    assert arrays is not None and rec.aggregated
    assert np.array_equal(arrays["w"].numpy(), np.ones((2, 3), dtype=np.float32))  # the 1000s were not averaged in
    assert np.array_equal(arrays["b"].numpy(), np.ones(2, dtype=np.float32))


def test_weighted_average_of_two_valid_replies(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)

    arrays, _ = strat.aggregate_train(1, [_train_reply(1, 0, 1.0, n=10), _train_reply(2, 1, 4.0, n=30)])

    assert np.allclose(arrays["w"].numpy(), 3.25)


def test_wrong_shapes_rejected(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    bad = Message(content=RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2, 3), "b": torch.zeros(5)}),
                                      "metrics": MetricRecord({"num-examples": 5, "partition-id": 1})}),
                  metadata=_md(5))

    arrays, _ = strat.aggregate_train(1, [_train_reply(4, 0, 2.0), bad])

    assert strat._fedrad.history.round(1).hospitals["hospital-2"]["status"].startswith("rejected: ")
    assert np.allclose(arrays["w"].numpy(), 2.0)


def test_every_hospital_refusing_budget_stops_the_study(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)

    with pytest.raises(StudyStopped):
        strat.aggregate_train(2, [_refusal(1), _refusal(2), _refusal(3)])

    history = strat._fedrad.history
    assert any("every hospital refused" in e for e in history.events)
    assert all(h["status"].startswith("refused") for h in history.round(2).hospitals.values())


def test_failures_that_are_not_budget_refusals_do_not_stop_the_study(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)

    result = strat.aggregate_train(1, [_refusal(1), _refusal(2, code=ERR_REFUSED)])

    assert result == (None, None)
    assert strat._fedrad.history.round(1).hospitals["node-2"]["status"].startswith("failed: ")


def test_too_few_usable_updates_keeps_global_model(tmp_path: Path) -> None:
    strat = _strategy(tmp_path, min_hospitals=2)

    result = strat.aggregate_train(1, [_train_reply(1, 0, 1.0), _train_reply(2, 1, 1.0, patient_id=1)])

    assert result == (None, None)
    assert not strat._fedrad.history.round(1).aggregated
    assert any("min_hospitals=2" in e for e in strat._fedrad.history.events)


def test_round_offset_applies_to_records(tmp_path: Path) -> None:
    strat = _strategy(tmp_path, offset=3)

    strat.aggregate_train(1, [_train_reply(1, 0, 1.0)])

    assert 4 in strat._fedrad.history.rounds and 1 not in strat._fedrad.history.rounds


def _eval_reply(node: int, partition: int, labels: np.ndarray, scores: np.ndarray, **extra) -> Message:
    probs = np.stack([1 - scores, scores], 1)
    metrics = MetricRecord({
        "num-examples": len(labels), "partition-id": partition,
        "histograms": score_histograms(labels, probs).reshape(-1).tolist(), **extra,
    })
    return Message(content=RecordDict({"metrics": metrics}), metadata=_md(node, MessageType.EVALUATE))


def test_aggregate_evaluate_pools_histograms(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    rng = np.random.default_rng(0)
    sites = [(rng.integers(0, 2, n), rng.random(n)) for n in (50, 70)]
    bad = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 3, "partition-id": 2, "mrn": 7})}),
                  metadata=_md(9, MessageType.EVALUATE))

    out = strat.aggregate_evaluate(1, [_eval_reply(1, 0, *sites[0], epsilon=0.3, epsilon_budget=1.0),
                                       _eval_reply(2, 1, *sites[1]), bad])

    hists = [score_histograms(y, np.stack([1 - s, s], 1)) for y, s in sites]
    expected = pooled_summary(hists)
    rec = strat._fedrad.history.round(1)
    assert rec.pooled["num_examples"] == 120
    assert rec.pooled["auc"] == pytest.approx(expected.auc)
    assert rec.pooled["loss"] == pytest.approx(expected.loss)
    assert rec.pooled["threshold"] == pytest.approx(expected.threshold)
    assert out["accuracy"] == pytest.approx(expected.accuracy)
    assert out["sensitivity"] == pytest.approx(expected.sensitivity)
    h1 = rec.hospitals["hospital-1"]
    assert h1["val_examples"] == 50 and h1["auc"] == pytest.approx(pooled_summary([hists[0]]).auc)
    assert h1["val_epsilon"] == 0.3 and "epsilon" not in h1  # the validation account, not training's
    assert rec.hospitals["hospital-3"]["status"].startswith("rejected")


def test_off_contract_fields_of_an_older_node_are_rejected(tmp_path: Path) -> None:
    """train_loss, val_loss, auc... were data-dependent and unprotected: a reply carrying them is off the
    contract and left out, never recorded."""
    strat = _strategy(tmp_path)
    rng = np.random.default_rng(4)
    y, s = rng.integers(0, 2, 40), rng.random(40)

    strat.aggregate_train(1, [_train_reply(1, 0, 1.0, train_loss=0.4, train_seconds=2.0)])
    strat.aggregate_evaluate(1, [_eval_reply(1, 0, y, s, val_loss=9.0, auc=0.99, accuracy=float("nan"))])

    h = strat._fedrad.history.round(1).hospitals["hospital-1"]
    assert h["status"].startswith("rejected") and "allow-list" in h["status"]
    assert "train_loss" not in h and h.get("val_loss") != 9.0 and h.get("auc") != 0.99


def test_history_json_is_strict_json(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    strat.aggregate_train(1, [_train_reply(1, 0, 1.0)])
    one_class = np.zeros(20, dtype=np.int64)  # AUC undefined: NaN in memory
    strat.aggregate_evaluate(1, [_eval_reply(1, 0, one_class, np.random.default_rng(0).random(20))])
    strat._fedrad.history.save()

    data = json.loads((tmp_path / "metrics.json").read_text())  # NaN would not be valid JSON

    assert data["rounds"][0]["hospitals"]["hospital-1"]["auc"] is None
    assert data["rounds"][0]["pooled_validation"]["auc"] is None
    assert data["rounds"][0]["pooled_validation"]["threshold"] is None


def test_strategy_registry_and_options() -> None:
    assert set(STRATEGIES) >= {"fedavg", "fedprox", "krum"}
    with pytest.raises(StrategyError, match="unknown strategy"):
        strategy_class("fedbest")
    study = parse_study({"strategy": {"name": "fedavg", "options": {"fraction_train": 0.5}}})
    with pytest.raises(StrategyError, match="federation/training"):
        strategy_kwargs(study, strategy_class("fedavg"))
    study = parse_study({"strategy": {"name": "fedavg", "options": {"bogus": 1}}})
    with pytest.raises(StrategyError, match="bogus"):
        strategy_kwargs(study, strategy_class("fedavg"))
    with pytest.raises(StrategyError, match="proximal_mu"):
        strategy_kwargs(parse_study({"strategy": {"name": "fedprox"}}), strategy_class("fedprox"))
    kw = strategy_kwargs(parse_study({"strategy": {"name": "fedprox"}, "training": {"proximal_mu": 0.1}}),
                         strategy_class("fedprox"))
    assert kw["proximal_mu"] == 0.1


def test_malformed_confusion_is_rejected_not_a_crash(tmp_path: Path) -> None:
    strat = _strategy(tmp_path)
    rng = np.random.default_rng(1)
    good = _eval_reply(1, 0, rng.integers(0, 2, 20), rng.random(20))
    bad = Message(content=RecordDict({"metrics": MetricRecord({
        "num-examples": 3, "partition-id": 1, "confusion": [1, 0, 2], "histograms": [0] * (4 * HIST_BINS)})}),
        metadata=_md(2, MessageType.EVALUATE))

    strat.aggregate_evaluate(1, [good, bad])

    rec = strat._fedrad.history.round(1)
    assert rec.hospitals["hospital-2"]["status"].startswith("rejected")
    assert rec.pooled["num_examples"] == 20


def test_console_shows_pooled_validation_and_test_at_the_threshold(tmp_path: Path) -> None:
    from rich.console import Console

    from fedrad.server.report import RichReporter, final_table, rounds_table

    strat = _strategy(tmp_path)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = 1 / (1 + np.exp(-(rng.normal(size=200) + 3 * y - 1.5)))
    strat.aggregate_train(1, [_train_reply(1, 0, 1.0, epsilon_budget=20.0)])
    strat.aggregate_evaluate(1, [_eval_reply(1, 0, y, s)])
    history = strat._fedrad.history
    rec = history.round(1)
    rec.global_test = {"loss": 0.41, "auc": 0.93, "sensitivity": 0.81, "specificity": 0.77}
    history.final_test = {"auc": 0.93, "sensitivity": 0.81, "specificity": 0.77, "accuracy": 0.79, "num_examples": 9}
    history.operating_threshold = {"value": rec.pooled["threshold"], "round": 1, "rule": "youden"}
    console = Console(record=True, width=200)

    reporter = RichReporter(console)
    reporter.study_started(name="t", first_round=1, total_rounds=1, hospitals=1)
    reporter.round_finished(rec, history)
    reporter.round_validated(rec, history)  # evaluate-first: the figures may arrive a round later
    reporter.study_finished(history)
    console.print(rounds_table(history))
    console.print(final_table(history))
    text = console.export_text()

    assert f"val AUC {rec.pooled['auc']:.3f} loss {rec.pooled['loss']:.3f}" in text
    assert "hospital-1 lifetime eps 1.00/20" in text  # the account named, with its own budget
    assert f"round 1 validated: val AUC {rec.pooled['auc']:.3f}" in text and "test AUC 0.930" in text
    assert f"{rec.pooled['threshold']:.4g}" in text and "0.810" in text and "0.770" in text
