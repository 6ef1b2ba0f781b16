"""``fedrad-node start`` supervises its SuperNode: a refusal by the coordinator (key not registered
or revoked) ends the node quickly with NodeRefusedError's exit code, while a node that may still count
as online (a crash and a quick restart) keeps retrying until the SuperLink can have noticed it is gone."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from fedrad.client.commands.node import (
    ONLINE_MARKER,
    REFUSED_MARKER,
    ConnectionWatch,
    NodeRefusedError,
    supervise,
)

#: A SuperNode stand-in that is refused at once, as Flower's would be (its watch writes the marker).
REFUSED_CHILD = [sys.executable, "-c",
                 "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('1'); sys.exit(1)"]


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin"}


def test_the_watch_records_activation_and_refusal_from_flowers_log(tmp_path: Path) -> None:
    # arrange
    log = logging.getLogger("flwr.test-watch")
    log.setLevel(logging.DEBUG)
    watch = ConnectionWatch(tmp_path)
    log.addHandler(watch)
    try:
        # act
        log.info("SuperNode ID: %s", 1234)
        log.error("Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
                  "[code: 2004] Failed to activate SuperNode.")
    finally:
        log.removeHandler(watch)
    # assert
    assert (tmp_path / ONLINE_MARKER).exists()
    assert (tmp_path / REFUSED_MARKER).exists()


def test_a_node_not_online_recently_is_refused_for_good_within_the_grace(tmp_path: Path) -> None:
    # arrange
    markers = tmp_path / "run"
    cmd = [*REFUSED_CHILD, str(markers / REFUSED_MARKER)]
    t0 = time.monotonic()
    # act
    with pytest.raises(NodeRefusedError) as info:
        supervise(cmd, env=_env(), rejoin_timeout_s=300, markers=markers, pause_s=0.1, refusal_grace_s=1.0)
    # assert: seconds, not the rejoin timeout; the documented exit code
    assert time.monotonic() - t0 < 60
    assert info.value.exit_code == 10
    assert "Failed to activate SuperNode" in str(info.value)


def test_a_refusal_right_after_being_online_is_retried_until_the_online_window_passed(tmp_path: Path) -> None:
    # arrange: this node was online a moment ago (a crash, then a quick restart)
    markers = tmp_path / "run"
    markers.mkdir()
    (markers / ONLINE_MARKER).touch()
    attempts = tmp_path / "attempts"
    child = [sys.executable, "-c",
             "import pathlib, sys; a = pathlib.Path(sys.argv[2]); a.write_text(a.read_text() + 'x') "
             "if a.exists() else a.write_text('x'); pathlib.Path(sys.argv[1]).write_text('1'); sys.exit(1)",
             str(markers / REFUSED_MARKER), str(attempts)]
    t0 = time.monotonic()
    # act
    with pytest.raises(NodeRefusedError):
        supervise(child, env=_env(), rejoin_timeout_s=300, markers=markers, pause_s=0.2, online_window_s=3.0,
                  refusal_grace_s=0.0)
    # assert: it kept trying while the SuperLink could still count the old connection, then gave up
    assert time.monotonic() - t0 >= 2.5
    assert len(attempts.read_text()) >= 2


def test_other_failures_are_retried_until_the_rejoin_timeout(tmp_path: Path) -> None:
    # arrange: a SuperNode that fails without being refused (e.g. the coordinator restarting)
    child = [sys.executable, "-c", "import sys; sys.exit(3)"]
    # act / assert
    with pytest.raises(Exception) as info:
        supervise(child, env=_env(), rejoin_timeout_s=1.0, markers=tmp_path / "run", pause_s=0.2)
    assert not isinstance(info.value, NodeRefusedError)
    assert "rejoin_timeout_s" in str(info.value)


LOGGING_PROBE = """
import logging, sys
from pathlib import Path
from fedrad.client.commands.node import configure_supernode_logging
configure_supernode_logging(level_name=sys.argv[1], markers=Path(sys.argv[2]))
import flwr.supercore.logger  # Flower's own console handler, as in the SuperNode
logging.getLogger("flwr").debug("Runtime.AcquireTask")
logging.getLogger("flwr").info("SuperNode ID: %s", 42)
logging.getLogger("httpx").info("HTTP Request: POST https://coordinator/v1/fleet/pull-messages")
logging.getLogger("fedrad.client.runtime.app").info("train task (warm start)")
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_the_supernode_logs_at_info_without_poll_lines_unless_debug(tmp_path: Path, level: str) -> None:
    # act
    import subprocess

    done = subprocess.run([sys.executable, "-c", LOGGING_PROBE, level, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin", "FLWR_LOG_LEVEL": level})
    out = done.stdout + done.stderr
    # assert
    assert done.returncode == 0, out
    assert out.count("SuperNode ID: 42") == 1  # once: not also through the root handler
    assert "train task (warm start)" in out
    assert ("Runtime.AcquireTask" in out) is (level == "DEBUG")
    assert ("HTTP Request:" in out) is (level == "DEBUG")
    assert (tmp_path / ONLINE_MARKER).exists()


def test_a_supernode_that_ran_a_while_starts_a_new_streak_of_failures(tmp_path: Path) -> None:
    # arrange: the first SuperNode runs a while (e.g. hours, before a coordinator restart), later ones fail at once
    attempts = tmp_path / "attempts"
    child = [sys.executable, "-c",
             "import pathlib, sys, time; a = pathlib.Path(sys.argv[1]); n = len(a.read_text()) if a.exists() else 0; "
             "a.write_text('x' * (n + 1)); time.sleep(2.0 if n == 0 else 0); sys.exit(3)", str(attempts)]
    # act
    with pytest.raises(Exception, match="rejoin_timeout_s"):
        supervise(child, env=_env(), rejoin_timeout_s=1.5, markers=tmp_path / "run", pause_s=0.2, long_run_s=1.0)
    # assert: restarted after the long run (the rejoin timeout counts from its end, not its start)
    assert len(attempts.read_text()) >= 2


def _refusal(status: int = 412, text: str = '{"code": 2004, "message": "Failed to activate SuperNode."}') -> Exception:
    import httpx

    request = httpx.Request("POST", "https://127.0.0.1:1/v1/fleet/activate-node")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, text=text,
                                                                                      request=request))


class _Activation:
    """Flower's ActivateNode stand-in: refuses ``refusals`` times, then activates."""

    def __init__(self, refusals: int, error: Exception | None = None) -> None:
        self.calls, self.refusals, self.error = 0, refusals, error or _refusal()

    def __call__(self, request: str) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise self.error
        return f"activated {request}"


def test_a_refusal_while_the_old_connection_may_count_online_is_retried_in_process(tmp_path: Path) -> None:
    # arrange: this node was alive a moment ago (its launcher touched the marker), then crashed
    from fedrad.client.commands.node import retry_refusal_while_maybe_online

    online = tmp_path / ONLINE_MARKER
    online.touch()
    activate = _Activation(refusals=2)

    # act
    result = retry_refusal_while_maybe_online(activate, online=online, pause_s=0.01)("req")

    # assert: activated on the third try, without the SuperNode exiting
    assert result == "activated req" and activate.calls == 3


@pytest.mark.parametrize("case", ["never online", "online long ago", "other status", "other error"])
def test_other_refusals_and_errors_are_raised_at_once(tmp_path: Path, case: str) -> None:
    from fedrad.client.commands.node import retry_refusal_while_maybe_online

    online = tmp_path / ONLINE_MARKER
    if case != "never online":
        online.touch()
    if case == "online long ago":  # past the window: an unknown or revoked key, refused for good
        old = time.time() - 120
        import os

        os.utime(online, (old, old))
    error = {"other status": _refusal(status=401, text="Unauthorized"),
             "other error": _refusal(text='{"code": 9, "message": "Internal error"}')}.get(case, _refusal())
    activate = _Activation(refusals=5, error=error)

    with pytest.raises(type(error)):
        retry_refusal_while_maybe_online(activate, online=online, pause_s=0.01, online_window_s=80)("req")

    assert activate.calls == 1


def test_the_retry_window_is_fixed_at_the_first_refusal(tmp_path: Path) -> None:
    # arrange: something keeps the marker fresh (e.g. a second launcher on the same state folder)
    from fedrad.client.commands.node import retry_refusal_while_maybe_online

    online = tmp_path / ONLINE_MARKER
    online.touch()
    activate = _Activation(refusals=10**6)

    def refuse_and_touch(request: str) -> str:
        online.touch()
        return activate(request)

    # act / assert: it gives up once the window that began at the first refusal has passed
    t0 = time.monotonic()
    with pytest.raises(Exception, match="refused"):
        retry_refusal_while_maybe_online(refuse_and_touch, online=online, pause_s=0.05, online_window_s=0.5)("req")
    assert activate.calls >= 2 and time.monotonic() - t0 < 60
