"""Issue 9, point 5, on the node's warm runtime: tasks forked from the preloaded server pass the same
gate, keep no gate state between them, and leave no private app copy behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adversarial.test_gate_app_folder import CODE_FREE, EVIL, PYPROJECT, _drive, _runner
from fedrad.client.governance.app_folder import flower_app_folder
from fedrad.client.governance.approval import AppAllowList, fab_hash, inspect_fab
from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime.warm import WARM_SOCKET_ENV

HERE = Path(__file__).resolve().parent
PRELOAD = ["fedrad.client.runtime.gate", "fedrad.client.runtime.app", "flwr.supernode.runtime.run_clientapp"]


def task(argv: list[str]) -> int:
    """The warm runtime's task entry here: Flower's install/load steps behind the gate (fedrad.client.runtime.gate.main
    does the same around Flower's real runner), with the outcome written to ``argv[1]``."""
    import types

    import fedrad.client.runtime.app as fedrad_app
    from fedrad.client.runtime import gate
    node = types.SimpleNamespace(yaml=Path(argv[0]))
    runner = _runner(node, CODE_FREE)
    gate.install_gate(runner)
    installed: list[str] = []
    flower_install = runner.install_from_fab

    app, message, context = _drive(types.SimpleNamespace(
        pull_task_input=runner.pull_task_input, get_load_client_app_fn=runner.get_load_client_app_fn,
        install_from_fab=lambda *a, **k: installed.append(str(flower_install(*a, **k)))))
    out = {"fedrad_app": app is fedrad_app.app, "installed": installed, "pid": os.getpid()}
    if not out["fedrad_app"]:
        reply = app(message=message, context=context)
        out["error"] = reply.error.reason if reply.has_error() else None
    Path(argv[1]).write_text(json.dumps(out))
    return 0


@pytest.mark.slow
def test_forked_tasks_pass_the_same_gate(tmp_path: Path) -> None:
    home, marker = tmp_path / "flwr-home", tmp_path / "PWNED"
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text("site: hospital-a\nsuperlink: 127.0.0.1:9092\ninsecure: true\ndata: {path: site.npz}\n"
                         "state_dir: state\napps: {installed_code_only: true}\n")
    AppAllowList.for_state_dir(tmp_path / "state").approve(digest=fab_hash(CODE_FREE), by="dpo",
                                                          info=inspect_fab(CODE_FREE))
    sock, ready = tmp_path / "warm.sock", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "FLWR_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "fedrad.client.runtime.warm", "--socket", str(sock), "--ready", str(ready),
                               "--entry", "adversarial.test_gate_warm:task", "--preload", *PRELOAD], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), "warm runtime did not start"
        folder = flower_app_folder(flwr_home=home, fab_id="coordinator/fedradstudy", fab_version="1.0.0",
                                   digest=fab_hash(CODE_FREE))
        folder.mkdir(parents=True)
        (folder / "pyproject.toml").write_text(PYPROJECT.format(name="fedradstudy", publisher="coordinator",
                                                                clientapp="evil_warm:app"))
        (folder / "evil_warm.py").write_text(EVIL.format(marker=str(marker)))

        results = []
        for i in range(2):  # first with the pre-placed folder, then clean
            result = tmp_path / f"result-{i}.json"
            code = ("import sys; from fedrad.client.runtime.warm import run_via_warm_runtime; "
                    "sys.exit(run_via_warm_runtime(sys.argv[1:]) or 0)")
            subprocess.run([sys.executable, "-c", code, str(node_yaml), str(result)], env={**env, WARM_SOCKET_ENV:
                           str(sock)}, timeout=120, check=True, capture_output=True)
            results.append(json.loads(result.read_text()))
    finally:
        server.terminate()
        server.wait(timeout=30)

    refused, ran = results
    assert not refused["fedrad_app"] and "not the approved bundle" in refused["error"] and refused["installed"][0].endswith("fedrad-refused-app")
    assert ran["fedrad_app"] and ran["pid"] != refused["pid"]
    assert ran["installed"] and not Path(ran["installed"][0]).exists()  # the private copy went with the task
    assert not marker.exists() and not folder.exists()
    log = AuditLog(tmp_path / "state" / "audit.jsonl", key_file=tmp_path / "audit.key")
    assert log.verify() == [] and "evil_warm.py" in log.entries()[-1]["outcome"]
