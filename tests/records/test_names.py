"""Hospital names everywhere a person reads, one row per hospital however often it reconnects
(issue 11, part 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.common.config import parse_study
from fedrad.server.names import RegistryNames
from fedrad.server.study import run_study
from tests.conftest import small_study_dict
from tests.records.fake_hospitals import CoordinatorKilled, FakeHospitals, hospital_splits


def _registry(path: Path, ids: dict[str, int]) -> None:
    path.write_text(json.dumps({k: str(v) for k, v in ids.items()}), encoding="utf-8")


def test_registry_view_follows_re_registration(tmp_path: Path) -> None:
    reg = tmp_path / "nodes.json"
    _registry(reg, {"hospital-a": 111})
    names = RegistryNames(reg)
    assert names.get(111) == "hospital-a" and names.get(999) is None

    _registry(reg, {"hospital-a": 211, "hospital-b": 112})

    assert names[211] == "hospital-a" and names[112] == "hospital-b"
    assert names[111] == "hospital-a"  # the old id keeps its name (replies still in flight)


@pytest.mark.timeout(300)
def test_node_restarted_with_a_new_id_keeps_its_row(tmp_path: Path, server_identity) -> None:
    study = parse_study(small_study_dict(federation={"rounds": 3, "num_hospitals": 3, "min_hospitals": 1}))
    sites, run_dir, reg = hospital_splits(3, train=64, val=48), tmp_path / "run", tmp_path / "nodes.json"
    names = RegistryNames(reg)
    _registry(reg, {"hospital-a": 111, "hospital-b": 112, "hospital-c": 113})
    with pytest.raises(CoordinatorKilled):  # rounds 1-2, then the coordinator goes down
        run_study(FakeHospitals(study, sites=sites, crash_at=3, node_ids=[111, 112, 113], simulation=False, steps=2),
                  study=study, run_dir=run_dir, names=names)
    # hospital-a's node restarts with a new key: a new node id under the same name
    _registry(reg, {"hospital-a": 211, "hospital-b": 112, "hospital-c": 113})

    run_study(FakeHospitals(study, sites=sites, node_ids=[211, 112, 113], simulation=False, steps=2),
              study=study, run_dir=run_dir, names=names)

    m = json.loads((run_dir / "metrics.json").read_text())
    for r in m["rounds"]:
        assert set(r["hospitals"]) == {"hospital-a", "hospital-b", "hospital-c"}, r["round"]
    assert set(m["privacy"]) == {"hospital-a", "hospital-b", "hospital-c"}
    gov = json.loads((run_dir / "governance.json").read_text())
    rows = {h["name"]: h for h in gov["hospitals"]}
    assert set(rows) == {"hospital-a", "hospital-b", "hospital-c"}  # no phantom node-211 row
    assert rows["hospital-a"]["rounds_contributed"] == 3
    assert "node-" not in (run_dir / "governance.md").read_text()
