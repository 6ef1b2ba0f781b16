"""Issue 9, point 4: the coordinator no longer controls a study's limits on the node.

Before: ``study-id``, ``total-rounds``, ``server-round`` and ``round-offset`` came from the
message unchecked: rotating the study id spent the per-study limit again and again, claiming
the last round lowered the noise, and a study declaring ``rounds: 1`` was trained at round
10/10. Now the node keys each study by its content hash (cosmetic fields left out), counts its
rounds and evaluations in its own ledger, calibrates for *its* remaining rounds, refuses a study
whose rounds are done, and caps the number of distinct studies (``max_studies``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.client.runtime import app as client_app
from fedrad.common.config import COSMETIC_FIELDS, study_key
from fedrad.common.privacy import calibrate_noise
from fedrad.common.protocol import ERR_BUDGET, ERR_POLICY
from tests.adversarial.test_node_kit import message, sim_context, sim_ledger, study


def _train(s, state: Path, **kw):  # type: ignore[no-untyped-def]
    return client_app.train(message(s, "train", state, **kw), sim_context())


def test_rotating_the_study_id_does_not_give_fresh_rounds(tmp_path: Path) -> None:
    s = study(federation={"rounds": 2})
    replies = [_train(s, tmp_path, server_round=1, study_id=sid) for sid in ("id-a", "id-b", "id-c")]

    assert [r.has_error() for r in replies] == [False, False, True]
    assert [r.content["metrics"]["round"] for r in replies[:2]] == [1, 2]
    assert replies[2].error.code == ERR_BUDGET and "all its 2 rounds" in replies[2].error.reason
    ledger = sim_ledger(tmp_path)
    (key,) = ledger["studies"]
    assert key == study_key(s) and ledger["studies"][key]["train_rounds"] == 2


def test_renaming_the_study_does_not_give_a_fresh_budget(tmp_path: Path) -> None:
    s = study(federation={"rounds": 1, "name": "original"})
    renamed = study(federation={"rounds": 1, "name": "renamed", "round_timeout_s": 60.0},
                    output={"dir": "/elsewhere"})
    assert study_key(s) == study_key(renamed) and s.fingerprint() != renamed.fingerprint()

    first = _train(s, tmp_path)
    again = _train(renamed, tmp_path, study_id=renamed.fingerprint()[:16])

    assert not first.has_error()
    assert again.has_error() and again.error.code == ERR_BUDGET


def test_claiming_the_last_round_does_not_lower_the_noise(tmp_path: Path) -> None:
    s = study(federation={"rounds": 10})

    reply = _train(s, tmp_path, server_round=10, total=10)  # "this is the last round: spend it all"

    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    assert metrics["round"] == 1
    ledger = PrivacyLedger.load(tmp_path / "hospital-1" / "privacy-ledger.json")
    key = study_key(s)
    (entry,) = [e for e in ledger.entries if e["study"] == key]
    # the noise the node used is calibrated for all 10 of the study's rounds, after the size release
    expected = calibrate_noise(prior_history=ledger.history_of(key)[:1], sample_rate=entry["sample_rate"],
                               steps=entry["steps"] * 10, target_epsilon=8.0, delta=1e-5)
    assert metrics["noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    last_round = calibrate_noise(prior_history=ledger.history_of(key)[:1], sample_rate=entry["sample_rate"],
                                 steps=entry["steps"], target_epsilon=8.0, delta=1e-5)
    assert metrics["noise_multiplier"] > 1.5 * last_round  # what the claim would have bought
    assert metrics["study_epsilon"] < 4.0  # well under the study's 8


def test_a_one_round_study_is_trained_once_whatever_round_is_claimed(tmp_path: Path) -> None:
    s = study(federation={"rounds": 1})

    first = _train(s, tmp_path, server_round=10, total=10, offset=3)
    second = _train(s, tmp_path, server_round=1, total=1)

    assert not first.has_error() and first.content["metrics"]["round"] == 1
    assert second.has_error() and second.error.code == ERR_BUDGET


def test_a_replayed_round_is_charged_as_a_new_round_never_free(tmp_path: Path) -> None:
    s = study(federation={"rounds": 3})
    msg_kw = {"server_round": 1}
    lengths = []
    for _ in range(3):
        assert not _train(s, tmp_path, **msg_kw).has_error()
        lengths.append(len(sim_ledger(tmp_path)["entries"]))

    assert lengths[0] < lengths[1] < lengths[2]
    assert _train(s, tmp_path, **msg_kw).has_error()  # and once the study's rounds are done, refused


def test_max_studies_refuses_a_new_study_before_anything_is_written(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  max_studies: 2\n  min_hospitals: 1\n")
    state = tmp_path / "state"
    studies = [study(training={"lr": lr}, simulation={"node_policy": str(policy)}) for lr in (0.01, 0.02, 0.03)]
    for s in studies[:2]:
        assert not _train(s, state).has_error()
    path = state / "hospital-1" / "privacy-ledger.json"
    before = path.read_bytes()

    reply = _train(studies[2], state)
    evaluation = client_app.evaluate_global(message(studies[2], "evaluate", state), sim_context())

    for r in (reply, evaluation):
        assert r.has_error() and r.error.code == ERR_POLICY and "rule max_studies" in r.error.reason
    assert path.read_bytes() == before
    assert not _train(studies[0], state).has_error()  # a known study goes on


def test_study_key_ignores_only_cosmetic_fields() -> None:
    base = study()
    assert "federation.name" in COSMETIC_FIELDS and "output" in COSMETIC_FIELDS
    for over in ({"federation": {"name": "x"}}, {"output": {"dir": "/x"}}, {"training": {"device": "cuda"}},
                 {"federation": {"round_timeout_s": 5.0}}):
        assert study_key(study(**over)) == study_key(base), over
    for over in ({"federation": {"rounds": 3}}, {"privacy": {"epsilon": 4.0}}, {"training": {"lr": 0.5}},
                 {"model": {"name": "resnet"}}):
        assert study_key(study(**over)) != study_key(base), over


def test_a_study_begun_before_the_upgrade_keeps_its_rounds(tmp_path: Path) -> None:
    """A version-1 ledger holds the study's rounds under the coordinator's old study id; after the
    upgrade the node adopts them: no fresh rounds, no fresh per-study budget."""
    import json

    from fedrad.client.runtime.site import simulated_site

    s = study(federation={"rounds": 2}, privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-5,
                                                 "noise_multiplier": 1.0})
    site = simulated_site(s, partition_id=0, num_partitions=3, state_dir=tmp_path)
    legacy = s.fingerprint()[:16]
    v1 = {"version": 1, "budget_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "dataset_id": site.dataset_id,
          "history": [[1.0, 0.3, 7]],
          "entries": [{"time": 1.0, "study": legacy, "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.3,
                       "steps": 7, "epsilon_before": 0.0, "epsilon_after": 1.0}], "created": 1.0}
    site.ledger_path.parent.mkdir(parents=True)
    site.ledger_path.write_text(json.dumps(v1), encoding="utf-8")

    second = _train(s, tmp_path, server_round=2, study_id=legacy)
    third = _train(s, tmp_path, server_round=2, study_id=legacy)

    assert not second.has_error(), second.error.reason
    assert second.content["metrics"]["round"] == 2  # round 1 was trained before the upgrade
    assert third.has_error() and third.error.code == ERR_BUDGET
    ledger = PrivacyLedger.load(site.ledger_path)
    assert ledger.history_of(study_key(s)).count((1.0, 0.3, 7)) == 1  # the old round counts for the study
