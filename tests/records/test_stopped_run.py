"""A run that Flower stopped (no signal reaches the ServerApp) is marked by the coordinator's CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fedrad.server.app import mark_ended
from fedrad.server.history import StudyHistory
from fedrad.server.run_records import mark_interrupted
from fedrad.server.stop_request import RunStopRequested, guard_run, request_stop, stop_requested


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


def test_after_a_stop_request_the_runs_serverapp_saves_nothing_more(tmp_path: Path) -> None:
    # arrange: the ServerApp of run "7" guards its folder; `fedrad stop 7` leaves its request
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s-1")
    with guard_run(tmp_path, run_id="7"):
        history.save()
        request_stop(tmp_path, run_id="7")
        history.round(1).seconds = 1.0

        # act / assert: the next save is refused and writes nothing
        with pytest.raises(RunStopRequested, match="fedrad stop"):
            history.save()
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds"] == []
    history.save()  # outside the ServerApp's guard (e.g. `fedrad stop` itself) saves still work
    assert len(json.loads((tmp_path / "metrics.json").read_text())["rounds"]) == 1


def test_an_old_stop_request_does_not_stop_a_resumed_run(tmp_path: Path) -> None:
    request_stop(tmp_path, run_id="7")  # the first run, stopped
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s-1")

    with guard_run(tmp_path, run_id="8"):  # resumed in the same folder: a new Flower run id
        history.save()

    assert stop_requested(tmp_path, run_id="7") and not stop_requested(tmp_path, run_id="8")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "running"


def test_the_mark_is_the_last_word_while_the_serverapp_keeps_saving(tmp_path: Path) -> None:
    # arrange: a ServerApp thread saving "running" as fast as it can (the race seen in e2e runs)
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s-1")
    history.save()
    ended: list[BaseException] = []

    def serverapp() -> None:
        with guard_run(tmp_path, run_id="7"):
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    history.round(1).seconds += 1.0
                    history.save()
            except RunStopRequested as exc:
                ended.append(exc)

    worker = threading.Thread(target=serverapp)
    worker.start()
    time.sleep(0.05)

    # act: what `fedrad stop` does: request, (Flower stops the run), mark
    request_stop(tmp_path, run_id="7")
    marked = mark_interrupted(tmp_path, reason="stopped with `fedrad stop`")
    worker.join(timeout=30)

    # assert
    assert not worker.is_alive() and len(ended) == 1
    assert marked is not None
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"


def test_a_serverapp_ending_after_a_stop_request_marks_it_interrupted_too(tmp_path: Path) -> None:
    # the ServerApp may end before `fedrad stop` marks (or `fedrad stop` may have given up waiting)
    _running_history(tmp_path, rounds=1)
    request_stop(tmp_path, run_id="7")

    mark_ended(tmp_path / "metrics.json", RuntimeError("run is not running"), run_id="7")

    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"
    assert mark_interrupted(tmp_path, reason="stopped with `fedrad stop`") is None  # already marked


def test_without_a_stop_request_a_crash_is_recorded_as_failed(tmp_path: Path) -> None:
    _running_history(tmp_path, rounds=1)

    mark_ended(tmp_path / "metrics.json", RuntimeError("boom"), run_id="7")

    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed: RuntimeError"


def test_a_guarded_history_refuses_to_go_on_once_a_stop_is_requested(tmp_path: Path) -> None:
    history = StudyHistory(tmp_path / "metrics.json", study={}, study_id="s-1")
    history.check_stop()  # not guarded: nothing to check
    with guard_run(tmp_path, run_id="7"):
        history.check_stop()
        request_stop(tmp_path, run_id="7")

        with pytest.raises(RunStopRequested):
            history.check_stop()


def test_an_unreadable_record_does_not_hide_why_the_run_ended(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{not json")
    request_stop(tmp_path, run_id="7")

    mark_ended(tmp_path / "metrics.json", RuntimeError("boom"), run_id="7")  # logs, does not raise

    assert (tmp_path / "metrics.json").read_text() == "{not json"


@pytest.mark.timeout(60)
def test_stop_marks_a_run_whose_serverapp_guard_is_registered_in_the_same_process(tmp_path: Path) -> None:
    # arrange: the ServerApp's guard is active in this process (a simulation, or a test), stop requested
    _running_history(tmp_path, rounds=1)
    with guard_run(tmp_path, run_id="7"):
        request_stop(tmp_path, run_id="7")
        # act: `fedrad stop`'s mark holds the metrics lock and saves: it must not wait on its own lock
        marked = mark_interrupted(tmp_path, reason="stopped with `fedrad stop`")

    # assert
    assert marked is not None
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"
