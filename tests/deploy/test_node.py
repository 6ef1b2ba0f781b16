"""The hospital node's own config, its preflight and the SuperNode command it starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrad.client.cli import main as node_main
from fedrad.client.commands.node import preflight, supernode_command
from fedrad.client.runtime.node import load_site
from fedrad.client.runtime.node_config import load_node_config
from fedrad.common.errors import ConfigError, FedradError

from .conftest import free_port, provision_federation

NPZ = Path(__file__).resolve().parents[2] / "fedrad" / "data" / "pneumoniamnist.npz"


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    fed = tmp_path / "federation.yaml"
    # a free port: nothing must listen at the kit's coordinator address (whatever else runs on this host)
    fed.write_text(f"name: t\nsuperlink: {{address: 127.0.0.1, port: {free_port()}}}\nhospitals: [hospital-a]\n")
    provision_federation(fed, tmp_path / "prov")
    kit = tmp_path / "prov" / "nodes" / "hospital-a"
    with np.load(NPZ) as d:
        np.savez(kit / "site.npz", **{k: d[k][:100] for k in d.files})
    node_yaml = kit / "node.yaml"
    node_yaml.write_text(node_yaml.read_text().replace("/path/to/site-data.npz", "site.npz"))
    return node_yaml


def test_provisioned_kit_passes_preflight_and_loads_its_site(kit: Path) -> None:
    warnings: list[tuple[str, str]] = []
    assert preflight(kit, warnings=warnings) == []
    # nothing listens at the kit's coordinator address: a warning (the node would keep retrying), not a problem
    node = load_node_config(kit)
    assert len(warnings) == 1 and f"coordinator {node.superlink} not reachable" in warnings[0][0]
    site = load_site(node, channels=1, image_size=28, class_names=("normal", "pneumonia"))
    assert site.name == "hospital-a" and len(site.data.train) == 100
    assert site.ledger_path == kit.parent / "state" / "privacy-ledger.json"
    assert site.policy is not None and site.policy.require_dp  # the node's default policy applies


def test_preflight_names_each_problem_with_a_fix(kit: Path) -> None:
    (kit.parent / "ca.pem").unlink()
    (kit.parent / "node-auth.key").chmod(0o644)
    problems = dict(preflight(kit))
    assert any("CA certificate" in p and "missing" in p for p in problems)
    assert any("chmod 600" in fix for fix in problems.values())
    assert node_main(["check", "--config", str(kit)]) == 1


def test_supernode_command_uses_tls_and_node_key_unless_insecure_on_both_sides(kit: Path) -> None:
    cmd = supernode_command(kit, insecure=False)
    assert "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--superlink") + 1] == load_node_config(kit).superlink
    with pytest.raises(FedradError, match="both"):
        supernode_command(kit, insecure=True)  # --insecure alone is refused
    kit.write_text(kit.read_text().replace("insecure: false", "insecure: true"))
    assert "--insecure" in supernode_command(kit, insecure=True)


def test_preflight_finds_flowers_scripts_beside_the_interpreter_without_path(
        kit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # arrange: the venv is used without being activated (its bin is not on PATH)
    monkeypatch.setenv("PATH", "/nonexistent")
    # act
    problems = preflight(kit, probe=False)
    # assert
    assert not any("flower-supernode" in p for p, _ in problems), problems


def test_node_yaml_errors_name_file_and_field(tmp_path: Path) -> None:
    p = tmp_path / "node.yaml"
    p.write_text("site: x\nsuperlink: h:1\ndata: {source: tape, path: d}\npolicy: {max_rounds: 0}\nextra: 1\n")
    with pytest.raises(ConfigError) as err:
        load_node_config(p)
    text = "\n".join(err.value.problems)
    assert str(p) in text and "data.source" in text and "policy.max_rounds" in text and "extra" in text


def test_check_prints_the_key_fingerprint_and_what_to_send(kit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedrad.client.runtime.node_keys import fingerprint

    node_main(["check", "--config", str(kit)])

    out = capsys.readouterr().out
    assert fingerprint((kit.parent / "node-auth.pub").read_bytes()) in out
    assert "never the private key" in out
