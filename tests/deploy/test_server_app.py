"""The deployment ServerApp's run configuration, and the node's dry-run command line."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.serverapp import ServerApp

from fedrad.client.cli import main as node_main
from fedrad.client.commands.node import supernode_command
from fedrad.common.errors import ConfigError
from fedrad.server.app import STUDY_KEY, LogReporter, app, resolve_run
from fedrad.server.progress import Reporter

from .conftest import provision_federation

NPZ = Path(__file__).resolve().parents[2] / "fedrad" / "data" / "pneumoniamnist.npz"


def test_app_is_a_server_app_and_log_reporter_is_a_reporter() -> None:
    assert isinstance(app, ServerApp)
    reporter: Reporter = LogReporter()  # structural check (mypy) and a smoke call
    reporter.round_started(1)


def test_run_config_without_study_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_run({})
    assert STUDY_KEY in err.value.problems[0]


def test_run_config_resolves_study_and_default_run_folder(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"federation": {"name": "s1"}, "output": {"dir": "out"}}))
    path, run_dir = resolve_run({STUDY_KEY: str(study), "run-dir": ""})
    assert path == study and run_dir.parent == tmp_path / "out" and run_dir.name.startswith("s1-")
    assert resolve_run({STUDY_KEY: str(study), "run-dir": str(tmp_path / "r")})[1] == tmp_path / "r"


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    fed = tmp_path / "federation.yaml"
    fed.write_text("name: t\nsuperlink: {address: coordinator.hospital-net.example.org}\nhospitals: [hospital-with-a-long-name]\n")
    provision_federation(fed, tmp_path / "a-rather-long-provisioning-folder-name")
    kit = tmp_path / "a-rather-long-provisioning-folder-name" / "nodes" / "hospital-with-a-long-name"
    with np.load(NPZ) as d:
        np.savez(kit / "site.npz", **{k: d[k][:50] for k in d.files})
    node_yaml = kit / "node.yaml"
    node_yaml.write_text(node_yaml.read_text().replace("/path/to/site-data.npz", "site.npz"))
    return node_yaml


def test_dry_run_command_has_tls_flags_and_no_insecure(kit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert node_main(["start", "--config", str(kit), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for flag in ("--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config"):
        assert flag in out
    assert "--insecure" not in out


def test_dry_run_prints_one_line_a_shell_can_run(kit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert node_main(["start", "--config", str(kit), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert shlex.split(out) == supernode_command(kit, insecure=False)
