"""``fedrad run`` follows a study by listing its run every second: the listing is asked through
Flower's Control API client in the fedrad process (no ``flwr`` process per question), with the same
answer as ``flwr ls --format json``; anything that fails there goes to the ``flwr`` CLI as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedrad.server import coordinator as cdn

from .conftest import Procs, free_port, provision_federation, wait_for

FED = "name: t\nsuperlink: {address: 127.0.0.1, port: 8443}\nhospitals: [hospital-a]\n"


@pytest.fixture()
def prov(tmp_path: Path) -> Path:
    (tmp_path / "federation.yaml").write_text(FED)
    provision_federation(tmp_path / "federation.yaml", tmp_path / "prov")
    return tmp_path / "prov"


def test_without_a_flower_connection_the_cli_answers_and_nothing_is_written(prov: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    co = cdn.Coordinator(prov)
    asked: list[list[str]] = []

    def fake(co_: Any, args: list[str], **kw: Any) -> dict[str, Any]:
        asked.append(list(args))
        return {"success": True, "runs": [{"run-id": "7", "status": "running"}]}

    monkeypatch.setattr(cdn, "flwr_json", fake)

    listed = cdn.runs(co, "7")

    assert listed == [{"run-id": "7", "status": "running"}] and asked == [["ls", cdn.CONNECTION, "--run-id", "7"]]
    assert not (co.flwr_home / "config.toml").exists()


@pytest.mark.slow
def test_the_in_process_listing_answers_as_flwr_ls_does(prov: Path, procs: Procs, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    co = cdn.Coordinator(prov)
    port = free_port()
    co.state_dir.mkdir(parents=True, exist_ok=True)
    procs.start("superlink", cdn.superlink_command(co, port=port, insecure=False), env=cdn.flwr_env(co))
    address = cdn.local_address(co, port)
    cdn.wait_until_listening(address, ca=co.ca, insecure=False, timeout=90, alive=procs.started["superlink"])
    cdn.write_flwr_config(co, address=address, insecure=False)
    assert cdn._runs_in_process(co, None) == cdn.flwr_json(co, ["ls", cdn.CONNECTION])["runs"] == []

    study = tmp_path / "missing-study.yaml"  # the run fails once its ServerApp starts: its listing still exists
    run_id = cdn.submit(co, study_file=study, run_dir=tmp_path / "run", poll_interval=0.25)
    inside = cdn._runs_in_process(co, run_id)
    cli = cdn.flwr_json(co, ["ls", cdn.CONNECTION, "--run-id", run_id])["runs"]

    assert len(inside) == len(cli) == 1 and set(inside[0]) == set(cli[0])
    for key in ("run-id", "federation-id", "fab-id", "fab-name", "fab-version", "fab-hash", "pending-at"):
        assert inside[0][key] == cli[0][key], key
    assert cdn.runs(co, run_id)[0]["run-id"] == run_id
    with pytest.raises(Exception, match="not found"):  # an unknown run: the CLI's error, as before
        cdn.runs(co, str(int(run_id) + 1))

    def no_cli(*a: Any, **k: Any) -> dict[str, Any]:
        raise AssertionError("the flwr CLI was started")

    monkeypatch.setattr(cdn, "flwr_json", no_cli)
    assert [r["run-id"] for r in cdn.runs(co, run_id)] == [run_id]  # answered without a `flwr` process
    monkeypatch.setenv(cdn.CONTROL_IN_PROCESS_ENV, "0")
    with pytest.raises(AssertionError, match="flwr CLI"):  # switched off: the CLI again
        cdn.runs(co, run_id)
