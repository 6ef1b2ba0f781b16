"""Issue 9 (SecAgg+ parts): a coordinator that lies in the SecAgg+ protocol cannot unmask one
hospital's update, played against the real ClientApp (``fedrad.client.runtime.secagg_app``) and Flower's
real ``secaggplus_mod`` (fast; in process). The deployed, end-to-end run over TLS with a hospital
dropping out is ``tests/secagg/test_secagg_deploy_e2e.py`` (slow).

Attack: the coordinator colludes with one hospital J and tells the victim's other neighbours
different stories in the unmask stage ("the victim is alive" to some: they reveal their share of
its private-mask seed; "it dropped out" to the others: they reveal their share of its pairwise
key). With both secrets it removes every mask from the victim's masked vector. Flower's semi-honest
SecAgg+ lets it choose the reconstruction threshold; with a strict majority (t = 3 of 5) the
attack works (``tests/secagg/test_secagg_units.py`` shows it on Flower's Shamir shares), so
hospitals now refuse any threshold below ``(n + 3) // 2`` and any single unmask request that asks
for both secrets of one hospital or calls themselves dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from fedrad.common.protocol import ERR_PROTOCOL
from tests.secagg.test_secagg_node_guard import NODES, Round, _setup, _stage, with_receipt  # noqa: F401

FIVE = (11, 22, 33, 44, 55)


def _state_shares(r: Round, holder: int, kind: str) -> dict[int, bytes]:
    state = r.ctx[holder].state.config_records[RECORD_KEY_STATE]
    return dict(zip(state[f"{kind}:K"], state[f"{kind}:V"]))  # type: ignore[arg-type]


def _recovers(shares: list[bytes], secret: bytes) -> bool:
    try:
        return combine_shares(shares) == secret
    except ValueError:  # too few shares: the combined padding is garbage
        return False


@pytest.mark.parametrize(("setup", "why"), [
    ({"sample": 5, "threshold": 3}, "below the safe 4"),  # the threshold that makes the attack work
    ({"sample": 3, "threshold": 2}, "threshold 2"),
    ({"sample": 2, "threshold": 2}, "2 hospitals"),  # a two-party sum: each learns the other's update
    ({"sample": 5, "shares": 2, "threshold": 2}, "share count 2"),
])
def test_hospital_refuses_an_unsafe_setup(tmp_path: Path, setup: dict[str, int], why: str) -> None:
    r = Round(tmp_path, FIVE)
    reply = r.send(FIVE[0], _setup(**setup))
    assert reply.has_error() and reply.error.code == ERR_PROTOCOL
    assert why in reply.error.reason
    assert RECORD_KEY_STATE not in r.ctx[FIVE[0]].state.config_records  # no key pair was even made


def test_lying_about_dropouts_with_one_colluder_does_not_unmask_the_victim(tmp_path: Path) -> None:
    r = Round(tmp_path, FIVE)
    colluder, victim, h1, h2, h3 = FIVE
    shares = r.share_keys(threshold=4)  # the lowest threshold a hospital accepts for 5 shares
    replies = r.collect(shares)
    assert all(not m.has_error() for m in replies.values())
    seed, key = _state_shares(r, victim, "rd_seed_share_dict"), _state_shares(r, victim, "sk1_share_dict")
    true_seed = r.ctx[victim].state.config_records[RECORD_KEY_STATE]["rd_seed"]
    assert seed and key and isinstance(true_seed, bytes)

    got_seed = [_state_shares(r, colluder, "rd_seed_share_dict")[victim]]  # the colluder hands over both
    got_key = [_state_shares(r, colluder, "sk1_share_dict")[victim]]
    everyone = list(FIVE)
    for holder, told_dead in ((victim, False), (h1, False), (h2, True), (h3, True)):
        active = [n for n in everyone if not (told_dead and n == victim)]
        dead = [victim] if told_dead else []
        reply = r.send(holder, _stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}))
        assert not reply.has_error(), reply.error.reason  # each request on its own looks consistent
        cfg = reply.content[RECORD_KEY_CONFIGS]
        for owner, share in zip(cfg[Key.NODE_ID_LIST], cfg[Key.SHARE_LIST]):  # type: ignore[arg-type]
            if owner == victim:
                (got_key if told_dead else got_seed).append(share)
    assert len(got_seed) == 3 and len(got_key) == 3  # one short of the threshold, for both secrets
    assert not _recovers(got_seed, true_seed)  # the private mask stays on the victim's vector
    # ...whereas a fourth seed share (h2's, had it been told "alive") recovers it: the check has power
    assert _recovers([*got_seed, _state_shares(r, h2, "rd_seed_share_dict")[victim]], true_seed)


@pytest.mark.parametrize(("active", "dead", "why"), [
    (list(NODES), [22], "both alive and dropped"),  # both secrets of 22 in one answer
    ([22, 33, 44], [11], "names this hospital dropped"),  # its own pairwise key, while its vector is in
    ([*NODES, 99], [], "never exchanged keys"),
    ([11, 22], [33], "sum of 2"),
])
def test_hospital_refuses_an_unmask_request_that_would_open_an_update(
        tmp_path: Path, with_receipt: None, active: list[int], dead: list[int], why: str) -> None:  # noqa: F811
    r = Round(tmp_path)
    r.collect(r.share_keys())
    reply = r.send(11, _stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}))
    assert reply.has_error() and reply.error.code == ERR_PROTOCOL
    assert why in reply.error.reason
