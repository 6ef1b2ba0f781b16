"""The deploy/ folder: the node launch script, systemd units, containers, the compose demo."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_launch_script_is_strict_bash_and_parses() -> None:
    path = DEPLOY / "fedrad-node.sh"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert path.stat().st_mode & 0o111, "fedrad-node.sh is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_node_script_runs_the_preflight_then_execs_the_node() -> None:
    text = (DEPLOY / "fedrad-node.sh").read_text()
    check, start = text.index("fedrad-node check --config"), text.index("exec fedrad-node start --config")
    assert check < start and "--insecure" not in text


def test_node_script_refuses_a_missing_config(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(DEPLOY / "fedrad-node.sh"), str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "not found" in proc.stderr


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


@pytest.mark.parametrize("unit", ["fedrad-node.service", "fedrad-coordinator.service"])
def test_systemd_units_have_unit_service_install(unit: str) -> None:
    u = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(u.sections())
    assert u["Service"]["User"] == "fedrad" and u["Service"]["Restart"] == "on-failure"
    assert u["Service"]["NoNewPrivileges"] == "yes" and u["Install"]["WantedBy"] == "multi-user.target"


def test_coordinator_unit_runs_the_tls_coordinator_command() -> None:
    # `fedrad coordinator start` always serves TLS with SuperNode authentication unless --insecure.
    cmd = _unit("fedrad-coordinator.service")["Service"]["ExecStart"]
    assert "fedrad coordinator start --prov" in cmd
    assert "--insecure" not in cmd and "ca.key" not in cmd


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["fedrad-node.service", "fedrad-coordinator.service"])
def test_systemd_units_pass_systemd_analyze_syntax(unit: str) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)],
                          capture_output=True, text=True, check=False)
    # Only missing install targets (/opt/fedrad/...) may be reported on a build machine.
    bad = [ln for ln in proc.stderr.splitlines() if ln.strip() and "/opt/fedrad" not in ln]
    assert not bad, proc.stderr


def test_compose_has_a_coordinator_and_three_hospitals() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"coordinator", "hospital-a", "hospital-b", "hospital-c"}
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.node"
        assert f"./sites/{name}:/etc/fedrad:ro" in svc["volumes"]  # its own folder: kit + its own key
        assert not any(v.startswith("./fed") for v in svc["volumes"])  # nothing of the coordinator's
    assert services["coordinator"]["ports"] == ["8000:8000"]  # the Fleet gateway only, never the control port
    assert not any(v.startswith("./sites") for v in services["coordinator"]["volumes"])  # no hospital key


@pytest.mark.parametrize("dockerfile", ["Dockerfile.node", "Dockerfile.coordinator"])
def test_dockerfiles_run_as_a_non_root_user(dockerfile: str) -> None:
    lines = [ln.strip() for ln in (DEPLOY / dockerfile).read_text().splitlines()]
    assert lines[next(i for i, ln in enumerate(lines) if ln.startswith("FROM"))].startswith("FROM python:3.11")
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] == "USER fedrad"
    assert any(ln.startswith("ENTRYPOINT") for ln in lines)


def test_coordinator_container_runs_the_coordinator_command() -> None:
    text = (DEPLOY / "Dockerfile.coordinator").read_text()
    assert 'ENTRYPOINT ["fedrad", "coordinator", "start"' in text and "--insecure" not in text


def test_prepare_demo_keeps_hospital_keys_out_of_the_coordinators_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(DEPLOY / "prepare-demo.py"), "--out", str(tmp_path / "fed"),
                           "--sites", str(tmp_path / "sites")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "sites" / "hospital-b"
    node = yaml.safe_load((site / "node.yaml").read_text())
    assert node["data"]["path"] == "/data/site.npz" and node["state_dir"] == "/var/lib/fedrad"
    assert node["superlink"] == "coordinator:8000"
    assert (site / "data" / "site.npz").exists() and (site / "ca.pem").exists()
    assert (site / "node-auth.key").stat().st_mode & 0o777 == 0o600
    # the coordinator's folder holds the hospitals' public keys, never a private one
    assert not any(b"PRIVATE KEY" in f.read_bytes() for f in (tmp_path / "fed").rglob("*")
                   if f.is_file() and f.parent.name != "coordinator")
    assert not list((tmp_path / "fed").rglob("node-auth.key"))
    registered = (tmp_path / "fed" / "coordinator" / "supernodes" / "hospital-b.pub").read_bytes()
    assert registered.split()[:2] == (site / "node-auth.pub").read_bytes().split()[:2]
    # re-running keeps every hospital's key
    key = (site / "node-auth.key").read_bytes()
    again = subprocess.run([sys.executable, str(DEPLOY / "prepare-demo.py"), "--out", str(tmp_path / "fed"),
                            "--sites", str(tmp_path / "sites")], capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert (site / "node-auth.key").read_bytes() == key


def test_node_kit_carries_the_launch_script(tmp_path: Path) -> None:
    from fedrad.server.provision import Provisioner, load_federation

    (tmp_path / "f.yaml").write_text("name: k\nsuperlink: {address: 127.0.0.1}\nhospitals: [a]\n")
    Provisioner(tmp_path / "p").provision(load_federation(tmp_path / "f.yaml"))
    assert (tmp_path / "p" / "nodes" / "a" / "fedrad-node.sh").read_bytes() == (DEPLOY / "fedrad-node.sh").read_bytes()
