"""A run that Flower stopped (no signal reaches the ServerApp) is marked by the coordinator's CLI."""

from __future__ import annotations

import json
from pathlib import Path

from fedrad.server.history import StudyHistory
from fedrad.server.run_records import mark_interrupted


def _running_history(run_dir: Path, rounds: int) -> None:
    history = StudyHistory(run_dir / "metrics.json", study={"federation": {"rounds": 50}}, study_id="s-1")
    for n in range(1, rounds + 1):
        history.round(n).seconds = 1.0
    history.save()


def test_a_running_record_becomes_interrupted_and_keeps_the_checkpointed_rounds(tmp_path: Path) -> None:
    _running_history(tmp_path, rounds=3)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round-0002.pt").write_bytes(b"")  # rounds 1-2 checkpointed, 3 not

    marked = mark_interrupted(tmp_path, reason="stopped with `fedrad stop`")

    data = json.loads((tmp_path / "metrics.json").read_text())
    assert marked is not None and data["status"] == "interrupted"
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert any("fedrad stop" in e and "round 3" in e for e in data["events"])


def test_a_finished_or_missing_record_is_left_alone(tmp_path: Path) -> None:
    assert mark_interrupted(tmp_path, reason="x") is None  # no metrics.json yet
    _running_history(tmp_path, rounds=1)
    data = json.loads((tmp_path / "metrics.json").read_text())
    data["status"] = "completed"
    (tmp_path / "metrics.json").write_text(json.dumps(data))

    assert mark_interrupted(tmp_path, reason="x") is None
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"
