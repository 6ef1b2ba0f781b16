"""A resumed study never ends worse than its last good checkpoint (issue 11, part 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrad.common.config import parse_study
from fedrad.server.best_model import BEST_MODEL, LAST_MODEL, MODEL, noise_warning
from fedrad.server.history import StudyHistory
from fedrad.server.study import run_study
from tests.conftest import small_study_dict
from tests.records.fake_hospitals import CoordinatorKilled, FakeHospitals, hospital_splits


def _study(rounds: int = 3):
    return parse_study(small_study_dict(federation={"rounds": rounds, "num_hospitals": 3, "min_hospitals": 1}))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_coordinator_killed_in_last_round_then_resumed_keeps_the_better_model(tmp_path: Path, server_identity) -> None:
    study, sites, run_dir = _study(), hospital_splits(3), tmp_path / "run"
    # arrange: rounds 1-2 run and are checkpointed; the coordinator dies as round 3 starts
    with pytest.raises(CoordinatorKilled):
        run_study(FakeHospitals(study, sites=sites, crash_at=3), study=study, run_dir=run_dir)
    before = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in before["rounds"]] == [1, 2] and before["status"] == "running"
    auc_before_crash = before["rounds"][-1]["pooled_validation"]["auc"]
    ckpt2 = torch.load(run_dir / "checkpoints" / "round-0002.pt", weights_only=True)

    # act: resume; the re-run round 3 is trained with ten times the noise (little budget left)
    history = run_study(FakeHospitals(study, sites=sites, noisy_rounds={3: 10.0}), study=study, run_dir=run_dir)

    # assert: the noisy round made the last model worse, and model.pt is not that one
    m = json.loads((run_dir / "metrics.json").read_text())
    pooled = {r["round"]: r["pooled_validation"]["auc"] for r in m["rounds"]}
    assert m["status"] == "completed" and sorted(pooled) == [1, 2, 3]
    assert pooled[3] < auc_before_crash, pooled  # precondition: the resumed round really is worse
    choice = m["model"]
    assert choice["is"] == "best" and choice["round"] in (1, 2) and choice["last_round"] == 3
    assert pooled[choice["round"]] >= auc_before_crash  # never worse than the checkpoint before the crash
    final = torch.load(run_dir / MODEL, weights_only=True)
    best = torch.load(run_dir / BEST_MODEL, weights_only=True)
    last = torch.load(run_dir / LAST_MODEL, weights_only=True)
    assert final["round"] == choice["round"] and final["selected"] == "best"
    assert _same(final["state_dict"], best["state_dict"]) and best["round"] == choice["round"]
    if choice["round"] == 2:
        assert _same(final["state_dict"], ckpt2["state_dict"])
    assert last["round"] == 3 and not _same(last["state_dict"], final["state_dict"])
    # the threshold belongs to the chosen round; the warning about round 3's noise is recorded
    assert m["operating_threshold"]["round"] == choice["round"]
    assert any("round 3" in e and "noise multiplier 10" in e for e in m["events"]), m["events"]
    assert any(e.startswith(f"{MODEL} is the best global model") for e in history.events)
    gov = json.loads((run_dir / "governance.json").read_text())
    assert gov["model"]["selection"]["is"] == "best"


def test_noise_warning_compares_with_the_median_of_earlier_rounds(tmp_path: Path) -> None:
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s")
    for n, sigma in ((1, 1.0), (2, 1.1), (3, 1.55), (4, 1.7)):
        history.round(n).site("hospital-1")["noise_multiplier"] = sigma
    history.round(4).site("hospital-2")["noise_multiplier"] = 5.0  # no earlier rounds of its own

    assert noise_warning(history, 2, "hospital-1") is None
    assert noise_warning(history, 3, "hospital-1") is None  # 1.55 <= 1.5 x median(1.0, 1.1)
    warned = noise_warning(history, 4, "hospital-1")  # 1.7 > 1.5 x 1.1
    assert warned is not None and "hospital-1" in warned and "1.7" in warned
    assert "the study's earlier rounds" in (noise_warning(history, 4, "hospital-2") or "")
    assert noise_warning(history, 1, "hospital-1") is None  # nothing earlier to compare with
