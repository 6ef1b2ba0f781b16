"""The global model and the updates packed into one array on the wire (issue 14: fewer objects)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedrad.client.runtime import app as client_app
from fedrad.common.config import parse_study
from fedrad.common.errors import ProtocolError
from fedrad.common.packing import PACKED_KEY, as_unpacked, is_packed, pack_arrays, unpack_arrays
from fedrad.common.protocol import check_reply
from fedrad.server.study import PACK_ENV, make_strategy
from tests.adversarial.test_coordinator_poisoned_replies import SHAPES, _train, _wiring
from tests.adversarial.test_node_kit import global_arrays, message, sim_context, study
from tests.records.conftest import server_identity  # noqa: F401 - the fixture


def _record(dtype: str = "float32") -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"z.w": Array(rng.standard_normal((3, 4)).astype(dtype)),
                        "a.b": Array(rng.standard_normal(5).astype(dtype)),
                        "m.k": Array(rng.standard_normal((2, 1, 3, 3)).astype(dtype))})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pack_then_unpack_is_bitwise_the_same(dtype: str) -> None:
    record = _record(dtype)
    shapes = {k: tuple(v.shape) for k, v in record.items()}

    packed = pack_arrays(record)
    back = unpack_arrays(packed, shapes=shapes, dtype=dtype, what="test")

    assert packed is not None and is_packed(packed) and packed[PACKED_KEY].shape == (12 + 5 + 18,)
    assert list(back.keys()) == list(shapes)  # the receiver's own order
    for name, arr in record.items():
        assert back[name].numpy().dtype == np.dtype(dtype) and np.array_equal(back[name].numpy(), arr.numpy())


def test_records_that_cannot_share_one_array_travel_as_they_are() -> None:
    mixed = ArrayRecord({"w": Array(np.zeros(3, np.float32)), "n": Array(np.zeros(1, np.int64))})
    single = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    assert pack_arrays(mixed) is None and pack_arrays(single) is None
    assert as_unpacked(mixed, shapes={"w": (3,), "n": (1,)}, dtype="float32", what="t") is mixed


@pytest.mark.parametrize(("payload", "problem"), [
    (np.zeros(34, np.float32), "expected float32\\(35,\\)"),  # one value short
    (np.zeros(36, np.float32), "expected float32\\(35,\\)"),  # one too many
    (np.zeros(35, np.float64), "expected float32"),  # another dtype
    (np.zeros((5, 7), np.float32), "expected float32"),  # not flat
])
def test_a_packed_model_that_does_not_fit_is_refused_before_decoding(payload: np.ndarray, problem: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in _record().items()}
    with pytest.raises(ProtocolError, match=f"the global model: packed model is .*{problem}"):
        unpack_arrays(ArrayRecord({PACKED_KEY: Array(payload)}), shapes=shapes, dtype="float32",
                      what="the global model")
    with pytest.raises(ProtocolError, match="not a packed model"):
        unpack_arrays(_record(), shapes=shapes, dtype="float32", what="the global model")


def test_the_coordinator_packs_its_messages_unless_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                server_identity: None) -> None:  # noqa: F811
    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3]

    arrays = ArrayRecord({k: Array(np.ones(v, np.float32)) for k, v in SHAPES.items()})
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))

    packed = list(strat.configure_train(1, arrays, ConfigRecord({"study": "{}"}), _Grid()))
    monkeypatch.setenv(PACK_ENV, "0")
    plain = list(strat.configure_train(1, arrays, ConfigRecord({"study": "{}"}), _Grid()))

    assert len(packed) == 3 and all(is_packed(m.content["arrays"]) for m in packed)
    assert all(set(m.content["arrays"].keys()) == set(SHAPES) for m in plain)


def test_the_coordinator_unpacks_a_packed_update_and_refuses_one_that_does_not_fit(tmp_path: Path) -> None:
    strat = make_strategy(parse_study({"federation": {"num_hospitals": 3, "min_hospitals": 1}}), _wiring(tmp_path))
    good = _train(1, 0, value=2.0)
    good.content["arrays"] = pack_arrays(good.content["arrays"])
    short = _train(2, 1, value=2.0)
    short.content["arrays"] = ArrayRecord({PACKED_KEY: Array(np.zeros(3, np.float32))})

    screened = strat._screen_one(good, "train")
    with pytest.raises(ProtocolError, match="train reply: packed model"):
        strat._screen_one(short, "train")

    assert {k: v.tolist() for k, v in screened.arrays.items()} == {"w": [[2.0] * 3] * 2, "b": [2.0] * 2}


def test_a_node_answers_a_packed_message_packed_and_audits_the_arrays(tmp_path: Path) -> None:
    # arrange: a train message whose global model is packed
    s = study(privacy={"enabled": False})
    state = tmp_path / "state"
    arrays = global_arrays(s, seed=3)
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    msg = message(s, "train", state, arrays=arrays)
    msg.content["arrays"] = pack_arrays(arrays)

    # act
    reply = client_app.train(msg, sim_context())

    # assert: packed reply that unpacks into a valid update of the model; the audit names the arrays
    assert not reply.has_error(), reply.error.reason
    assert is_packed(reply.content["arrays"])
    update = unpack_arrays(reply.content["arrays"], shapes=shapes, dtype="float32", what="reply")
    check_reply(RecordDict({"arrays": update, "metrics": MetricRecord(dict(reply.content["metrics"]))}),
                kind="train", expected_shapes=shapes)
    entry = json.loads((state / "hospital-1" / "audit.jsonl").read_text().splitlines()[-1])
    assert sorted(a["name"] for a in entry["arrays"]) == sorted(shapes)


def test_a_node_refuses_a_packed_model_that_does_not_fit(tmp_path: Path) -> None:
    s = study(privacy={"enabled": False})
    msg = message(s, "train", tmp_path / "state", arrays=global_arrays(s))
    msg.content["arrays"] = ArrayRecord({PACKED_KEY: Array(np.zeros(7, np.float32))})

    reply = client_app.train(msg, sim_context())

    assert reply.has_error() and "packed model" in reply.error.reason


def test_only_an_array_record_of_numpy_arrays_is_a_packed_model() -> None:
    import io

    assert not is_packed(MetricRecord({PACKED_KEY: 1.0}))  # type: ignore[arg-type]
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(35, np.float32))  # an .npz archive behind .npy metadata
    fake = Array(dtype="float32", shape=(35,), stype="numpy.ndarray", data=buf.getvalue())
    shapes = {k: tuple(v.shape) for k, v in _record().items()}
    with pytest.raises(ProtocolError, match="the global model: packed model"):
        unpack_arrays(ArrayRecord({PACKED_KEY: fake}), shapes=shapes, dtype="float32", what="the global model")
