"""Issue 14 on the coordinator: evaluations inside train replies and float16-delta updates.

Every reply is hostile until screened: an evaluation inside a train reply is used only when the
coordinator asked that node for one, and only after the evaluate checks (signed counts bounded,
right length); a float16-delta update is checked (float16 exactly, finite, shapes) and added to the
coordinator's OWN copy of the global arrays it sent that round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType

from fedrad.common.config import parse_study
from fedrad.common.metrics import HIST_BINS
from fedrad.common.protocol import EVALUATE_FIRST_KEY
from fedrad.server.screening import MAX_EXAMPLES, RejectedReply, screen_train
from fedrad.server.study import make_strategy, run_study
from tests.adversarial.test_coordinator_poisoned_replies import SHAPES, _hist, _train, _wiring
from tests.conftest import small_study_dict
from tests.records.conftest import server_identity  # noqa: F401 - the fixture
from tests.records.fake_hospitals import FakeHospitals, hospital_splits


class CountingHospitals(FakeHospitals):
    """FakeHospitals that also record every message they get (type, round, evaluate-first)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.seen: list[tuple[str, int, bool]] = []

    def _answer(self, msg: Message) -> Message:
        cfg = msg.content["config"]
        self.seen.append((msg.metadata.message_type, int(cfg["server-round"]), cfg.get(EVALUATE_FIRST_KEY) is True))
        return super()._answer(msg)


def _study(**fed: Any) -> Any:
    d = small_study_dict(federation={"name": "wire", "num_hospitals": 3, "rounds": 3, "min_hospitals": 3, **fed})
    return parse_study(d)


@pytest.mark.timeout(300)
def test_one_evaluate_message_per_study_and_every_round_validated(tmp_path: Path, server_identity: None) -> None:
    study = _study()
    grid = CountingHospitals(study, sites=hospital_splits(3), steps=2)

    history = run_study(grid, study=study, run_dir=tmp_path / "run")

    evaluates = [s for s in grid.seen if s[0] == MessageType.EVALUATE]
    trains = [s for s in grid.seen if s[0] == MessageType.TRAIN]
    assert [r for _, r, _ in evaluates] == [3, 3, 3]  # only the final model, once per hospital
    assert [(r, first) for _, r, first in trains] == [(1, False)] * 3 + [(2, True)] * 3 + [(3, True)] * 3
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for r in m["rounds"]:  # every round's model validated (pooled and per site) and tested
        assert r["pooled_validation"]["sites"] == 3 and r["pooled_validation"]["auc"] is not None, r["round"]
        assert r["global_test"]["auc"] is not None
        assert all(h["val_examples"] > 0 and h["node_eval_round"] >= 1 for h in r["hospitals"].values())
        assert {"screen", "aggregate", "checkpoint"} <= set(r["coordinator_seconds"])
    assert history.model_choice["round"] in (1, 2, 3) and m["operating_threshold"]["value"] is not None


@pytest.mark.timeout(300)
def test_the_old_flow_stays_available_for_benchmarks(tmp_path: Path, server_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedrad.server.study as study_mod

    monkeypatch.setattr(study_mod, "SEPARATE_EVALUATE", True)
    study = _study(rounds=2)
    grid = CountingHospitals(study, sites=hospital_splits(3), steps=2)

    run_study(grid, study=study, run_dir=tmp_path / "run")

    assert [r for t, r, _ in grid.seen if t == MessageType.EVALUATE] == [1, 1, 1, 2, 2, 2]
    assert not any(first for _, _, first in grid.seen)


def _asked(strategy: Any, nodes: set[int], sent: dict[str, np.ndarray]) -> None:
    """What configure_train leaves behind when it asked ``nodes`` for an evaluation of ``sent``."""
    strategy._asked, strategy._sent_arrays, strategy._pending_validation = nodes, sent, 0
    strategy._fedrad.history.round(0)


def _val(hist: list[int] | None = None, **over: Any) -> dict[str, Any]:
    h = _hist() if hist is None else hist
    return {"val-num-examples": 40, "val-histograms": h, "val-round": 1, "val-epsilon": 0.5,
            "val-epsilon_budget": 4.0, **over}


def test_an_evaluation_is_used_only_when_asked(tmp_path: Path) -> None:
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))
    _asked(strat, {1}, {k: np.zeros(v, np.float32) for k, v in SHAPES.items()})

    strat.aggregate_train(1, [_train(1, 0, **_val()), _train(2, 1, **_val())])

    pooled = strat._fedrad.history.round(0).pooled
    assert pooled["sites"] == 1 and pooled["num_examples"] == 40  # hospital-2 was not asked: ignored
    assert strat._fedrad.history.round(1).hospitals["hospital-2"]["status"] == "ok"  # its update still counts


BAD_VAL = [
    ("hugely negative", _val([-MAX_EXAMPLES - 1] + [0] * (4 * HIST_BINS - 1))),
    ("short", _val([0] * (4 * HIST_BINS - 1))),
    ("fraction", _val([0.5] + [0.0] * (4 * HIST_BINS - 1))),
    ("no round", {k: v for k, v in _val().items() if k != "val-round"}),
    ("refusal with data", {**_val(), "val-refused": 4001}),
    ("odd refusal code", {"val-refused": 17}),
]


@pytest.mark.parametrize("case, metrics", BAD_VAL, ids=[c[0] for c in BAD_VAL])
def test_a_malformed_evaluation_rejects_the_reply(tmp_path: Path, case: str, metrics: dict[str, Any]) -> None:
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))
    _asked(strat, {1, 2}, {k: np.zeros(v, np.float32) for k, v in SHAPES.items()})

    arrays, _ = strat.aggregate_train(1, [_train(1, 0, value=2.0, **_val()), _train(2, 1, value=50.0, **metrics)])

    history = strat._fedrad.history
    assert history.round(1).hospitals["hospital-2"]["status"].startswith("rejected")
    assert history.round(0).pooled["sites"] == 1
    assert np.allclose(arrays["w"].numpy(), 2.0)  # the rejected update is left out


def test_a_refused_evaluation_is_recorded_and_the_update_kept(tmp_path: Path) -> None:
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))
    _asked(strat, {1}, {k: np.zeros(v, np.float32) for k, v in SHAPES.items()})

    arrays, _ = strat.aggregate_train(1, [_train(1, 0, value=3.0, **{"val-refused": 4001})])

    history = strat._fedrad.history
    assert "refused" in history.round(0).hospitals["hospital-1"]["val_status"]
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 3.0)


# ------------------------------------------------------------------------------- float16-delta
def _delta_reply(delta: dict[str, np.ndarray]) -> Any:
    return ArrayRecord({k: Array(v) for k, v in delta.items()})


def _content(arrays: ArrayRecord) -> Any:
    from flwr.app import MetricRecord, RecordDict

    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})


def test_a_delta_is_added_to_the_coordinators_own_copy() -> None:
    sent = {"w": np.full((2, 3), 1.5, np.float32), "b": np.array([-1.0, 2.0], np.float32)}
    delta = {"w": np.full((2, 3), 0.25, np.float16), "b": np.array([0.5, -0.5], np.float16)}

    out = screen_train(_content(_delta_reply(delta)), expected_shapes=SHAPES, update_encoding="float16-delta",
                       sent_global=sent)

    assert out.arrays["w"].dtype == np.float32 and np.allclose(out.arrays["w"], 1.75)
    assert np.allclose(out.arrays["b"], [-0.5, 1.5])


@pytest.mark.parametrize("delta, field", [
    ({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float16)}, "arrays.w"),  # float32 under float16-delta
    ({"w": np.full((2, 3), np.inf, np.float16), "b": np.ones(2, np.float16)}, "arrays.w"),
    ({"w": np.ones((3, 2), np.float16), "b": np.ones(2, np.float16)}, "arrays.w"),
])
def test_bad_deltas_are_rejected(delta: dict[str, np.ndarray], field: str) -> None:
    sent = {k: np.zeros(v, np.float32) for k, v in SHAPES.items()}

    with pytest.raises(RejectedReply) as err:
        screen_train(_content(_delta_reply(delta)), expected_shapes=SHAPES, update_encoding="float16-delta",
                     sent_global=sent)
    assert err.value.field == field


def test_a_nan_delta_is_rejected() -> None:
    sent = {k: np.zeros(v, np.float32) for k, v in SHAPES.items()}
    delta = {"w": np.full((2, 3), np.nan, np.float16), "b": np.zeros(2, np.float16)}

    with pytest.raises(RejectedReply, match="non-finite"):
        screen_train(_content(_delta_reply(delta)), expected_shapes=SHAPES, update_encoding="float16-delta",
                     sent_global=sent)


@pytest.mark.timeout(300)
def test_a_float16_delta_study_runs_end_to_end(tmp_path: Path, server_identity: None) -> None:
    study = _study(rounds=2, update_encoding="float16-delta")
    grid = CountingHospitals(study, sites=hospital_splits(3), steps=2)

    history = run_study(grid, study=study, run_dir=tmp_path / "run")

    assert history.status == "completed"
    assert all(r.aggregated for r in history.rounds.values())
    assert all(h["status"] == "ok" for r in history.rounds.values() for h in r.hospitals.values())


def test_no_config_of_a_train_message_leaks_between_rounds(tmp_path: Path, server_identity: None) -> None:
    """The evaluate-first flag is set on copies: the study's shared train config never carries it."""
    config = ConfigRecord({"study": "{}"})
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))
    strat._fedrad.fold_evaluation = True
    strat._fedrad.history.round(1)  # round 1 happened and has no validation yet

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3]

    arrays = ArrayRecord({k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()})
    msgs = list(strat.configure_train(2, arrays, config, _Grid()))

    assert len(msgs) == 3 and all(m.content["config"][EVALUATE_FIRST_KEY] is True for m in msgs)
    assert EVALUATE_FIRST_KEY not in config
