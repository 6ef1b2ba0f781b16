"""The node's warm ClientApp runtime (fedrad.client.runtime.warm): forked tasks behave like cold ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrad.client.runtime import gate
from fedrad.client.runtime.warm import WARM_SOCKET_ENV, run_via_warm_runtime

HERE = Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    # a deliberately long folder name: the socket path exceeds the 108-byte Unix address limit
    sock = tmp_path / ("s" * 90) / "run" / "warm.sock"
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fedrad.client.runtime.warm", "--socket", str(sock), "--ready", str(ready),
                             "--entry", "warm_entry:main", "--preload", "numpy"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait(ready.exists, 60), "warm runtime did not start"
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def _shim(sock: Path, *args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    code = ("import sys; from fedrad.client.runtime.warm import run_via_warm_runtime; "
            "rc = run_via_warm_runtime(sys.argv[1:]); sys.exit(97 if rc is None else rc)")
    env = {**os.environ, WARM_SOCKET_ENV: str(sock), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _sleeping_task(sock: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """A shim whose task sleeps for a minute, and the task's pid once it runs."""
    pidfile = tmp_path / "task.pid"
    shim = _shim(sock, "sleep", str(pidfile), "60", cwd=tmp_path)
    assert _wait(lambda: pidfile.exists() and pidfile.read_text() != "")
    return shim, int(pidfile.read_text())


def test_task_runs_in_a_forked_process_with_the_shims_stdio_env_cwd_and_exit_code(server, tmp_path: Path) -> None:
    sock, proc = server
    assert len(str(sock)) > 108
    assert sock.stat().st_mode & 0o777 == 0o600

    outs = []
    for code in ("3", "0"):
        shim = _shim(sock, "report", code, cwd=tmp_path, extra_env={"WARM_TEST_VALUE": f"v{code}"})
        out, err = shim.communicate(timeout=60)
        outs.append((shim.returncode, json.loads(out), err))

    for (rc, report, err), code in zip(outs, (3, 0)):
        assert rc == code
        assert report["argv"] == ["report", str(code)]
        assert report["cwd"] == str(tmp_path)
        assert report["env"] == f"v{code}"
        assert report["warm"] == "1"
        assert report["pid"] != proc.pid
        assert "to stderr" in err
    assert outs[0][1]["pid"] != outs[1][1]["pid"]
    assert outs[0][1]["np"] != outs[1][1]["np"]  # numpy reseeded per task
    assert outs[0][1]["py"] != outs[1][1]["py"]
    assert proc.poll() is None  # the server keeps serving


def test_sys_exit_status_is_relayed(server, tmp_path: Path) -> None:
    sock, _ = server
    shim = _shim(sock, "exit", "42", cwd=tmp_path)
    shim.communicate(timeout=60)
    assert shim.returncode == 42


def test_sigterm_to_the_shim_reaches_the_task(server, tmp_path: Path) -> None:
    sock, _ = server
    shim, task = _sleeping_task(sock, tmp_path)

    shim.send_signal(signal.SIGTERM)
    shim.communicate(timeout=30)

    assert shim.returncode == 128 + signal.SIGTERM
    assert _wait(lambda: not _alive(task))


def test_task_is_stopped_when_its_launcher_dies(server, tmp_path: Path) -> None:
    sock, _ = server
    shim, task = _sleeping_task(sock, tmp_path)

    shim.kill()
    shim.wait(timeout=10)

    assert _wait(lambda: not _alive(task))


def test_server_stop_ends_tasks_and_removes_socket(server, tmp_path: Path) -> None:
    sock, proc = server
    shim, task = _sleeping_task(sock, tmp_path)

    proc.terminate()
    proc.wait(timeout=30)
    shim.communicate(timeout=30)

    assert not _alive(task)
    assert not sock.exists()
    assert shim.returncode != 0


def test_unreachable_runtime_means_cold_start(tmp_path: Path) -> None:
    assert run_via_warm_runtime(["x"], socket_path=str(tmp_path / "none.sock")) is None
    (tmp_path / "plain").write_text("not a socket")
    assert run_via_warm_runtime(["x"], socket_path=str(tmp_path / "plain")) is None


def test_shim_runs_through_the_warm_runtime(tmp_path: Path) -> None:
    shim = gate.write_shim(tmp_path / "bin").read_text()
    assert "from fedrad.client.runtime.warm import run_task" in shim
    compile(shim, "flwr-clientapp", "exec")
