"""The safe-point stop behind Ctrl-C, without the simulation engine (issue 11, part 2)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedrad.common.config import parse_study
from fedrad.server.interrupt import InterruptibleGrid, StopRequest, StudyInterrupted, stop_on_signals
from fedrad.server.study import run_study
from tests.conftest import small_study_dict
from tests.records.fake_hospitals import FakeHospitals, hospital_splits


class SilentGrid(Grid):
    """Hospitals that never answer (the hang of issue 11): pushes are accepted, no reply comes."""

    def __init__(self) -> None:
        self.pulls = 0

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        time.sleep(timeout or 0)  # what waiting for hospitals that never answer amounts to
        return []


def test_a_stop_ends_a_wait_for_replies_within_a_poll(tmp_path: Path, server_identity) -> None:
    stop = StopRequest()
    grid = InterruptibleGrid(SilentGrid(), stop)
    threading.Timer(0.3, stop.request, args=("test",)).start()
    t0 = time.monotonic()

    with pytest.raises(StudyInterrupted, match="test"):
        grid.send_and_receive([Message(RecordDict(), 1, "train", group_id="1")], timeout=3600)

    assert time.monotonic() - t0 < 5  # not the round timeout


def test_signals_request_a_stop_instead_of_raising() -> None:
    # arrange: Python's own Ctrl-C handler (a shell's background job starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopRequest()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: still no KeyboardInterrupt
        deadline = time.monotonic() + 5
        while stop.signals < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    restored = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, before)
    assert stop.is_set() and stop.signals == 2 and "SIGINT" in stop.reason
    assert restored is signal.default_int_handler  # restored


@pytest.mark.timeout(300)
def test_interrupted_study_keeps_its_checkpointed_rounds(tmp_path: Path, server_identity) -> None:
    study = parse_study(small_study_dict(federation={"rounds": 4, "num_hospitals": 3, "min_hospitals": 1}))
    stop, run_dir = StopRequest(), tmp_path / "run"

    class StopInRound3(FakeHospitals):
        def _answer(self, msg: Message) -> Message:
            cfg = msg.content["config"]
            if int(cfg["server-round"]) == 3 and msg.metadata.message_type == "train":
                stop.request("SIGINT received")
            return super()._answer(msg)

    grid = InterruptibleGrid(StopInRound3(study, sites=hospital_splits(3, train=64, val=48), steps=2), stop)

    history = run_study(grid, study=study, run_dir=run_dir)

    m = json.loads((run_dir / "metrics.json").read_text())
    assert history.status == m["status"] == "interrupted"
    assert [r["round"] for r in m["rounds"]] == [1, 2]  # round 3 was not finished: re-run on resume
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    assert any("interrupted (SIGINT received) after round 2" in e for e in m["events"])
    assert not (run_dir / "model.pt").exists()  # no final model for an unfinished study
