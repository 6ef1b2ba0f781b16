"""The SuperLink's SQLite tuning (issue 14): Flower's real SQL link state on a database file, with the
expired-token cleanup throttled and the traffic counters batched, still records every byte."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedrad.server import superlink_tuning as tuning


def _fresh_class(name: str, **methods: Any) -> type:
    return type(name, (), dict(methods))


def test_token_cleanup_runs_at_most_once_per_interval_per_state() -> None:
    calls: list[int] = []
    cls = _fresh_class("State", _cleanup_expired_task_tokens=lambda self: calls.append(id(self)))
    now = [100.0]
    tuning.throttle_token_cleanup(cls, every_s=1.0, clock=lambda: now[0])
    a, b = cls(), cls()

    a._cleanup_expired_task_tokens()
    a._cleanup_expired_task_tokens()  # same instant: skipped
    b._cleanup_expired_task_tokens()  # another state: its own schedule
    now[0] += 1.01
    a._cleanup_expired_task_tokens()

    assert calls == [id(a), id(b), id(a)]


def test_traffic_batch_adds_up_and_writes_once_per_run_on_flush() -> None:
    written: list[tuple[int, int, int]] = []
    batch = tuning.TrafficBatch(lambda run, sent, recv: written.append((run, sent, recv)))

    for _ in range(5):
        batch.add(7, bytes_sent=100, bytes_recv=0)
    batch.add(7, bytes_sent=0, bytes_recv=30)
    batch.add(8, bytes_sent=1, bytes_recv=2)
    assert written == [] and batch.pending() == {7: (500, 30), 8: (1, 2)}
    batch.flush()

    assert sorted(written) == [(7, 500, 30), (8, 1, 2)] and batch.pending() == {}


def test_traffic_of_a_vanished_run_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def write(run: int, sent: int, recv: int) -> None:
        raise ValueError(f"Run {run} not found")

    batch = tuning.TrafficBatch(write)
    batch.add(9, bytes_sent=5, bytes_recv=0)
    batch.flush()

    assert "traffic of run 9 not recorded" in caplog.text and batch.pending() == {}


@pytest.fixture()
def sql_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Flower's SqlLinkState on a database file, as the coordinator's SuperLink makes it, tuned."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink import config_loader

    for attr in ("_cleanup_expired_task_tokens", "store_traffic"):  # undone after the test
        monkeypatch.setattr(SqlLinkState, attr, getattr(SqlLinkState, attr))
    for flag in ("_fedrad_cleanup_throttled", "_fedrad_traffic_batched"):
        monkeypatch.setattr(SqlLinkState, flag, False, raising=False)
    from flwr.superlink import main

    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)  # Flower's own, back after the test
    monkeypatch.setattr(main, "_fedrad_scoped", False, raising=False)
    tuning.tune_superlink_sql()
    _, links = config_loader.get_objectstore_linkstate_factories(
        str(tmp_path / "superlink.db"), config_loader.get_federation_manager(is_simulation=False))
    return links.state()


def _create_run(state: Any) -> int:
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType

    run_id = int(state.create_run("fedrad", "0.1.0", "hash", {}, NOOP_FEDERATION_ID, None, "aid",
                                  TaskType.SERVER_APP))
    assert run_id != 0
    return run_id


def test_flowers_sql_link_state_gets_every_byte_once_the_batch_is_written(sql_state: Any) -> None:
    run_id = _create_run(sql_state)

    for _ in range(40):  # what 40 object pulls and pushes record
        sql_state.store_traffic(run_id, bytes_sent=1000, bytes_recv=0)
        sql_state.store_traffic(run_id, bytes_sent=0, bytes_recv=10)
    assert isinstance(vars(sql_state).get("_fedrad_traffic"), tuning.TrafficBatch)  # batched, not written per call
    deadline = time.monotonic() + 10  # the flusher writes every 0.5 s
    run = sql_state.get_run_info(run_ids=[run_id])[0]
    while (run.bytes_sent, run.bytes_recv) != (40_000, 400) and time.monotonic() < deadline:
        time.sleep(0.1)
        run = sql_state.get_run_info(run_ids=[run_id])[0]

    assert (run.bytes_sent, run.bytes_recv) == (40_000, 400)
    with pytest.raises(ValueError):  # Flower's own checks still refuse nonsense at once
        sql_state.store_traffic(run_id, bytes_sent=-1, bytes_recv=0)


def test_the_launched_superlink_process_reports_the_tuning_unless_switched_off(tmp_path: Path) -> None:
    for value, expected in ((None, True), ("0", False)):
        env = {k: v for k, v in os.environ.items() if k != tuning.SQL_TUNING_ENV}
        if value is not None:
            env[tuning.SQL_TUNING_ENV] = value
        out = subprocess.run([sys.executable, "-m", "fedrad.server.coordinator", "--help"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("expired-token cleanup at most every" in out.stderr) is expected


def test_flowers_middleware_stack_keeps_authentication_and_scopes_only_path_specific_layers() -> None:
    from flwr.superlink import main
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware

    assert not getattr(main, "_fedrad_scoped", False)  # Flower's own stack in this test process
    original = list(main._get_middleware())

    scoped = tuning.scoped_middleware(original, tracing=False)
    traced = tuning.scoped_middleware(original, tracing=True)

    plain = [m.cls for m in scoped if m.cls is not tuning.PathScoped]
    assert NodeAuthMiddleware in plain and ProtobufTranslationMiddleware in plain  # every request, as before
    assert RuntimeTracingMiddleware not in plain and RuntimeTracingMiddleware in [m.cls for m in traced]
    inner = {m.kwargs["inner"].__name__: m.kwargs["prefix"] for m in scoped if m.cls is tuning.PathScoped}
    assert inner == {"ControlSensitiveResponseMiddleware": "/v1/control/",
                     "ControlAuthenticationMiddleware": "/v1/control/", "ControlLicenseMiddleware": "/v1/control/",
                     "ControlEventLogMiddleware": "/v1/control/", "FleetEventLogMiddleware": "/v1/fleet/"}
    assert len(scoped) == len(original) - 1 and len(traced) == len(original)


def test_a_path_scoped_middleware_runs_on_its_paths_and_is_skipped_elsewhere() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    seen: list[str] = []

    class Recorder(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            seen.append(request.url.path)
            response = await call_next(request)
            response.headers["x-recorded"] = "1"
            return response

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("body " + request.url.path)

    app = Starlette(routes=[Route("/v1/{api}/{name}", ok, methods=["POST"])],
                    middleware=[Middleware(tuning.PathScoped, inner=Recorder, prefix="/v1/control/")])
    with TestClient(app) as client:
        control = client.post("/v1/control/list-runs", content=b"x" * 100_000)
        fleet = client.post("/v1/fleet/pull-object", content=b"y" * 100_000)

    assert seen == ["/v1/control/list-runs"]
    assert control.headers.get("x-recorded") == "1" and "x-recorded" not in fleet.headers
    assert control.text == "body /v1/control/list-runs" and fleet.text == "body /v1/fleet/pull-object"


def test_traffic_that_could_not_be_written_is_kept_for_the_next_flush() -> None:
    # arrange: the database is locked on the first flush
    written: list[tuple[int, int, int]] = []
    locked = [True]

    def write(run: int, sent: int, recv: int) -> None:
        if locked[0]:
            raise RuntimeError("database is locked")
        written.append((run, sent, recv))

    batch = tuning.TrafficBatch(write)
    batch.add(7, bytes_sent=10, bytes_recv=5)
    # act / assert: the failed flush raises and keeps the totals; the next one writes them once
    with pytest.raises(RuntimeError, match="locked"):
        batch.flush()
    assert batch.pending() == {7: (10, 5)}
    locked[0] = False
    batch.add(7, bytes_sent=1, bytes_recv=1)
    batch.flush()
    assert written == [(7, 11, 6)] and batch.pending() == {}
