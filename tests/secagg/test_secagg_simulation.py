"""A simulated federation under SecAgg+ with DP-SGD and one hospital dropping out.

Four hospitals; hospital-2's privacy ledger was spent by earlier work, so it takes part in the
SecAgg+ key sharing and then refuses to train (ERR_BUDGET): a dropout after key sharing, which the
coordinator must recover from (it reconstructs the dropped hospital's pairwise secret from the
other hospitals' shares). Checks: both rounds aggregate; the coordinator's aggregate equals the
example-weighted mean of the survivors' plaintext updates within the documented quantization
bound; the global model moves by exactly that aggregate; and what the coordinator received from
a single hospital is masked (uniform-looking integers, uncorrelated with its plaintext update).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad.client.privacy.budget import plan_round
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.client.runtime.secagg_app import CAPTURE_ENV
from fedrad.client.runtime.site import simulated_site
from fedrad.common.config import parse_study
from fedrad.common.errors import BudgetExceededError
from fedrad.common.models import build_model
from fedrad.common.protocol import ERR_BUDGET
from fedrad.server.checkpoints import load_checkpoint
from fedrad.server.secagg import SecAggRound, SecAggSettings, aggregation_error_bound, simulate_secagg
from tests.conftest import small_study_dict

SETTINGS = SecAggSettings(clipping_range=1.0, quantization_range=2**22, max_weight=1000.0)
DROPPED = "hospital-2"


def _exhaust_ledger(study, run_dir: Path) -> int:
    """Spend hospital-2's budget (as earlier studies would have) so that it refuses round 1."""
    site = simulated_site(study, partition_id=1, num_partitions=4, state_dir=run_dir / "sites")
    priv = study.privacy
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=priv.epsilon, delta=priv.delta,
                                accountant=priv.accountant, dataset_id=site.dataset_id)
    plan = plan_round(ledger=ledger, privacy=priv, training=study.training, num_examples=len(site.data.train),
                      server_round=1, total_rounds=study.federation.rounds)
    for _ in range(1000):
        try:
            ledger.reserve(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                           study="earlier-study", round=1)
        except BudgetExceededError:
            return len(ledger.entries)
    raise AssertionError("could not exhaust the ledger")


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[SecAggRound], object, int]:
    root = tmp_path_factory.mktemp("secagg")
    study = parse_study(small_study_dict(
        federation={"name": "secagg", "num_hospitals": 4, "rounds": 2, "min_hospitals": 2, "seed": 5,
                    "round_timeout_s": 120.0},
        privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.0},
    ))
    run_dir, capture = root / "run", root / "plaintext"
    prior = _exhaust_ledger(study, run_dir)
    seen: list[SecAggRound] = []
    mp = pytest.MonkeyPatch()
    mp.setenv(CAPTURE_ENV, str(capture))  # inherited by the simulated hospitals (test hook only)
    try:
        simulate_secagg(study, run_dir=run_dir, settings=SETTINGS, observer=seen.append)
    finally:
        mp.undo()
    return run_dir, capture, seen, study, prior


def _plaintext(capture: Path, rnd: int, site: str) -> tuple[int, list[str], list[np.ndarray]]:
    with np.load(capture / f"round-{rnd:04d}-{site}.npz") as z:
        names = [str(n) for n in z["names"]]
        return int(z["num_examples"]), names, [z[f"u{i}"] for i in range(len(names))]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rounds_complete_with_a_dropout(secagg_run) -> None:
    run_dir, capture, seen, _study, prior = secagg_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["aggregated"] for r in metrics["rounds"]] == [True, True]
    assert [r.round for r in seen] == [1, 2]
    for rec in seen:
        assert len(rec.sampled) == 4 and rec.num_shares == 4 and rec.threshold == 3
        assert len(rec.survivors) == 3
        (dropped,) = set(rec.sampled) - set(rec.survivors)
        stage, code, _reason = rec.failures[dropped]
        assert (stage, code) == ("collect_masked_vectors", ERR_BUDGET)  # after key sharing
        assert sorted(rec.names[n] for n in rec.survivors) == ["hospital-1", "hospital-3", "hospital-4"]
        assert not (capture / f"round-{rec.round:04d}-{DROPPED}.npz").exists()
    r1 = metrics["rounds"][0]["hospitals"]
    assert any(h["status"].startswith("refused: BudgetExceededError") for h in r1.values())
    for name in ("hospital-1", "hospital-3", "hospital-4"):
        assert r1[name]["status"] == "ok" and r1[name]["epsilon"] > 0  # each trained under its own DP ledger
        ledger = json.loads((run_dir / "sites" / name / "privacy-ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]
                if e["account"] == "train" and e["study"] != "<dataset-size>"] == [1, 2]
    dropped_ledger = json.loads((run_dir / "sites" / DROPPED / "privacy-ledger.json").read_text())
    # refused training before spending anything (it still answers evaluations from its validation account)
    assert len([e for e in dropped_ledger["entries"]
                if e["account"] == "train" and e["study"] != "<dataset-size>"]) == prior


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_aggregate_equals_plain_weighted_mean_of_survivors(secagg_run) -> None:
    _run_dir, capture, seen, _study, _prior = secagg_run
    for rec in seen:
        assert rec.aggregate is not None and rec.error_bound is not None
        plain = [_plaintext(capture, rec.round, rec.names[n]) for n in rec.survivors]
        ns = [p[0] for p in plain]
        names = plain[0][1]
        bound = aggregation_error_bound(ns, clipping_range=SETTINGS.clipping_range,
                                        quantization_range=SETTINGS.quantization_range,
                                        max_weight=SETTINGS.max_weight)
        assert bound == pytest.approx(rec.error_bound) and bound < 1e-4
        assert max(float(np.max(np.abs(u))) for p in plain for u in p[2]) < SETTINGS.clipping_range  # nothing clipped
        worst = 0.0
        for i, name in enumerate(names):
            exact = np.average(np.stack([p[2][i] for p in plain]), axis=0, weights=ns)
            worst = max(worst, float(np.max(np.abs(rec.aggregate[name] - exact))))
        assert worst < bound, (rec.round, worst, bound)
        # and the update is not trivially zero (the test would prove nothing)
        assert max(float(np.max(np.abs(u))) for u in plain[0][2]) > 100 * bound


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_global_model_moves_by_the_aggregate(secagg_run) -> None:
    run_dir, _capture, seen, study, _prior = secagg_run
    torch.manual_seed(study.federation.seed)
    m = study.model
    init = build_model(m.name, in_channels=1, num_classes=2, image_size=28, options=m.options).state_dict()
    after1 = load_checkpoint(run_dir / "checkpoints" / "round-0001.pt")["state_dict"]
    agg = seen[0].aggregate
    assert agg is not None
    for name, w0 in init.items():
        np.testing.assert_allclose(after1[name].numpy(), w0.numpy() + agg[name], atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_server_sees_only_masked_vectors(secagg_run) -> None:
    _run_dir, capture, seen, _study, _prior = secagg_run
    c, q, mod, w = SETTINGS.clipping_range, SETTINGS.quantization_range, SETTINGS.modulus_range, SETTINGS.max_weight
    rec = seen[0]
    assert set(rec.masked) == set(rec.survivors)  # the dropped hospital sent nothing
    for node in rec.survivors:
        n, _names, update = _plaintext(capture, rec.round, rec.names[node])
        masked = rec.masked[node]
        flat_masked = np.concatenate([np.ravel(a) for a in masked[1:]]).astype(np.float64)  # [0] is the weight
        flat_plain = np.concatenate([np.ravel(u) for u in update])
        assert flat_masked.shape == flat_plain.shape
        # Unmasked, every value would lie in [0, Q]; masked, they are spread over [0, 2**32).
        assert np.mean(flat_masked > q) > 0.99
        assert abs(float(np.mean(flat_masked)) / mod - 0.5) < 0.02
        # Read naively as a quantized update, the masked vector is unrelated to the plaintext one...
        r = round(n / w * q) / q
        naive = (flat_masked * (2 * c / q) - c) / r
        assert not np.allclose(naive, flat_plain, atol=1e-2)
        assert abs(np.corrcoef(naive, flat_plain)[0, 1]) < 0.05
        assert abs(np.corrcoef(flat_masked, flat_plain)[0, 1]) < 0.05
        # ...while the same reading of an *unmasked* quantization of it would recover it: the check has power.
        honest = np.clip(flat_plain * r, -c, c) * (q / (2 * c)) + q / 2
        assert np.corrcoef((honest * (2 * c / q) - c) / r, flat_plain)[0, 1] > 0.99
