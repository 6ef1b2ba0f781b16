"""The coordinator's governance report: who took part, which code, settings and model, epsilon per hospital."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrad.common.config import parse_study
from fedrad.common.models import build_model
from fedrad.server.checkpoints import save_checkpoint
from fedrad.server.governance import (
    build_report,
    package_hash,
    render_markdown,
    report_from_run_dir,
    state_dict_hash,
    write_report,
)
from fedrad.server.history import StudyHistory

STUDY = {"federation": {"name": "gov-study", "num_hospitals": 3, "rounds": 2, "min_hospitals": 2},
         "model": {"name": "cnn", "options": {"widths": [8, 16], "dense": 16}},
         "privacy": {"epsilon": 6.0, "delta": 1e-5}}


def _run(tmp_path: Path) -> tuple[Path, StudyHistory, object, torch.nn.Module]:
    study = parse_study(STUDY)
    run_dir = tmp_path / "run"
    hist = StudyHistory(run_dir / "metrics.json", study=study.to_dict(), study_id=study.fingerprint()[:16])
    for n in (1, 2):
        r = hist.round(n)
        r.hospitals["hospital-1"] = {"status": "ok", "epsilon": 2.0 * n, "epsilon_budget": 6.0,
                                     "num_examples": 100, "val_epsilon": 0.1 * n, "val_epsilon_budget": 1.0}
        r.hospitals["hospital-2"] = {"status": "ok", "epsilon": 2.5 * n, "epsilon_budget": 6.0,
                                     "num_examples": 80}
        r.record_receipt("hospital-1", "train", {"audit_head": f"{2 * n - 1:x}" * 64, "audit_count": 2 * n - 1})
        r.record_receipt("hospital-1", "evaluate", {"audit_head": f"{2 * n:x}" * 64, "audit_count": 2 * n})
    hist.round(1).hospitals["hospital-3"] = {"status": "refused: PolicyViolation: rule max_rounds: study asks | 2"}
    hist.round(2).hospitals["hospital-3"] = {"status": "failed: timeout"}
    hist.status = "completed"
    hist.final_test = {"auc": 0.9, "accuracy": 0.8, "sensitivity": 0.85, "specificity": 0.75, "num_examples": 64}
    hist.operating_threshold = {"value": 0.42, "round": 2, "rule": "youden"}
    hist.event("round 2: something noteworthy")
    hist.save()
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=28, options=STUDY["model"]["options"])
    save_checkpoint(run_dir / "model.pt", state_dict=model.state_dict(), study=study.to_dict(), round=2,
                    class_names=["a", "b"])
    return run_dir, hist, study, model


def test_report_names_hospitals_hashes_and_epsilon(tmp_path: Path) -> None:
    run_dir, hist, study, model = _run(tmp_path)
    jpath, mpath = write_report(history=hist, run_dir=run_dir, study=study, fab_hash="ab" * 32)
    rep = json.loads(jpath.read_text())
    assert rep["study"]["config_fingerprint"] == study.fingerprint()
    assert rep["study"]["study_id"] == study.fingerprint()[:16] and rep["study"]["status"] == "completed"
    assert rep["model"]["sha256"] == state_dict_hash(model.state_dict())
    assert rep["model"]["parameters"] == sum(p.numel() for p in model.state_dict().values())
    sw = rep["software"]
    assert sw["fedrad_package_sha256"] == package_hash()["sha256"] and sw["fedrad_package_files"] > 20
    assert sw["app_bundle_sha256"] == "ab" * 32 and sw["flwr_version"].startswith("1.41")
    hosp = {h["name"]: h for h in rep["hospitals"]}
    assert set(hosp) == {"hospital-1", "hospital-2", "hospital-3"}
    assert hosp["hospital-1"]["took_part"] and hosp["hospital-1"]["rounds_contributed"] == 2
    assert hosp["hospital-1"]["epsilon"] == 4.0 and hosp["hospital-2"]["epsilon"] == 5.0
    assert hosp["hospital-1"]["epsilon_budget"] == 6.0
    h3 = hosp["hospital-3"]
    assert not h3["took_part"] and h3["rounds_refused"] == 1 and h3["rounds_failed"] == 1 and h3["epsilon"] is None
    assert "rule max_rounds" in h3["refusals"][0]["reason"]
    # validation account and audit-log anchors (last receipt per hospital)
    assert hosp["hospital-1"]["val_epsilon"] == pytest.approx(0.2) and hosp["hospital-2"]["val_epsilon"] is None
    assert hosp["hospital-1"]["last_receipt"] == {"audit_head": "4" * 64, "audit_count": 4, "round": 2,
                                                  "kind": "evaluate"}
    assert hosp["hospital-2"]["last_receipt"] is None
    assert rep["operating_threshold"]["value"] == 0.42
    md = mpath.read_text()
    for text in ("gov-study", study.fingerprint(), rep["model"]["sha256"], "hospital-3", "rule max_rounds",
                 "something noteworthy", "ab" * 32, "4" * 64, "Audit-log anchors", "operating threshold 0.42"):
        assert text in md
    assert "asks \\| 2" in md  # table cells cannot be broken by a reason's text


def test_model_hash_identifies_the_exact_weights(tmp_path: Path) -> None:
    _, _, _, model = _run(tmp_path)
    sd = model.state_dict()
    h = state_dict_hash(sd)
    assert h == state_dict_hash({k: v.clone() for k, v in reversed(list(sd.items()))})  # order does not matter
    changed = {k: v.clone() for k, v in sd.items()}
    first = next(k for k, v in changed.items() if v.is_floating_point())
    changed[first].view(-1)[0] += 1e-6
    assert state_dict_hash(changed) != h
    assert state_dict_hash({**sd, first: sd[first].double()}) != h  # dtype is part of the identity


def test_report_rebuilt_from_run_folder_matches(tmp_path: Path) -> None:
    run_dir, hist, study, _ = _run(tmp_path)
    direct = build_report(history=hist, run_dir=run_dir, study=study)
    jpath, _ = report_from_run_dir(run_dir)
    again = json.loads(jpath.read_text())
    for key in ("study", "model", "hospitals", "software"):
        assert again[key] == json.loads(json.dumps(direct[key])), key
    assert render_markdown(again).startswith("# Governance report: gov-study")


def test_report_without_final_model(tmp_path: Path) -> None:
    run_dir, hist, study, _ = _run(tmp_path)
    (run_dir / "model.pt").unlink()
    rep = build_report(history=hist, run_dir=run_dir, study=study)
    assert rep["model"]["sha256"] is None and "no final model" in rep["model"]["note"]
    assert "final model sha256 (model.pt) | - |" in render_markdown(rep)


def test_a_missed_evaluation_is_reported_without_undoing_the_training(tmp_path: Path) -> None:
    # arrange: hospital-2 trained in round 2, but the final model's evaluation by it failed
    run_dir, hist, study, _ = _run(tmp_path)
    hist.round(2).hospitals["hospital-2"]["val_status"] = "failed: node unavailable"

    # act
    jpath, _ = write_report(history=hist, run_dir=run_dir, study=study)

    # assert
    h2 = {h["name"]: h for h in json.loads(jpath.read_text())["hospitals"]}["hospital-2"]
    assert h2["took_part"] and h2["rounds_contributed"] == 2 and h2["rounds_failed"] == 0
    assert h2["evaluations_missed"] == 1
    assert h2["refusals"] == [{"round": 2, "reason": "evaluation: failed: node unavailable"}]
