"""Issue 9, point 1: the DP noise can no longer be regenerated or reused by the coordinator.

Before: the training seed was derived from the study's ``federation.seed``, the round and the
partition id, and torch's global generator was seeded with it, so the coordinator could rebuild
the noise bit for bit, and the same round sent twice reused it. Now every generator is seeded
from OS entropy per round; only a simulation with ``simulation.reproducible_randomness`` is
seeded (for tests and research), and a deployed node refuses a study that sets it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime import app as client_app
from fedrad.common.protocol import ERR_POLICY
from tests.adversarial.test_node_kit import deployed_node, flat, message, sim_context, study


def _train_fresh(state_dir: Path, **over: object) -> np.ndarray:
    """Round 1 of the same study on a fresh copy of the same hospital (identical data, model, message)."""
    s = study(**over)
    torch.manual_seed(1234)  # the coordinator-known global generator state, the same for both runs
    reply = client_app.train(message(s, "train", state_dir), sim_context())
    assert not reply.has_error(), reply.error.reason
    return flat(reply.content["arrays"])


def test_same_round_with_the_same_inputs_gives_different_noise(tmp_path: Path) -> None:
    # Fixed noise so that nothing but the randomness could differ between the two runs.
    privacy = {"enabled": True, "epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.0}
    a = _train_fresh(tmp_path / "a", privacy=privacy)
    b = _train_fresh(tmp_path / "b", privacy=privacy)

    assert a.shape == b.shape
    assert not np.allclose(a, b)  # the noise (and sampling) differ although seed, round and partition agree


def test_replayed_round_message_is_trained_with_fresh_noise(tmp_path: Path) -> None:
    s = study(privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.0})
    msg_args = dict(kind="train", state_dir=tmp_path, server_round=1)

    first = client_app.train(message(s, **msg_args), sim_context())  # type: ignore[arg-type]
    replay = client_app.train(message(s, **msg_args), sim_context())  # type: ignore[arg-type]

    assert not first.has_error() and not replay.has_error()
    assert first.content["metrics"]["round"] == 1 and replay.content["metrics"]["round"] == 2  # the node's count
    # the difference of the two replies is not noise-free: it is not even zero
    assert not np.allclose(flat(first.content["arrays"]), flat(replay.content["arrays"]))


def test_reproducible_switch_in_simulation_repeats_exactly(tmp_path: Path) -> None:
    over = {"privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.0},
            "simulation": {"reproducible_randomness": True}}
    a = _train_fresh(tmp_path / "a", **over)
    torch.manual_seed(999)  # the global generator's state does not matter either way
    b = _train_fresh(tmp_path / "b", **over)

    np.testing.assert_array_equal(a, b)


def test_deployed_node_refuses_a_study_asking_for_reproducible_randomness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_yaml, ctx = deployed_node(tmp_path, monkeypatch)
    s = study(simulation={"reproducible_randomness": True})

    for call, kind in ((client_app.train, "train"), (client_app.evaluate_global, "evaluate")):
        reply = call(message(s, kind, None), ctx)
        assert reply.has_error() and reply.error.code == ERR_POLICY
        assert "simulation.reproducible_randomness" in reply.error.reason

    state = node_yaml.parent / "state"
    assert not (state / "privacy-ledger.json").exists()  # refused before anything was written
    outcomes = [e["outcome"] for e in AuditLog(state / "audit.jsonl").entries()]
    assert len(outcomes) == 2 and all("simulation.reproducible_randomness" in o for o in outcomes)


def test_switch_is_off_by_default_and_keeps_old_fingerprints() -> None:
    s = study()
    assert s.simulation.reproducible_randomness is False
    assert "reproducible_randomness" not in s.to_json()  # studies from before the switch keep their id
    assert "reproducible_randomness" in study(simulation={"reproducible_randomness": True}).to_json()
