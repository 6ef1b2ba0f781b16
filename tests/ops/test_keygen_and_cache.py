"""``fedrad-node keygen`` makes the audit key with the node's key pair; ``fedrad-node check`` names a
DICOM cache that cannot be written (e.g. under a read-only /data mount); the kits' node.yaml parses."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from fedrad.client.cli import main as node_main
from fedrad.client.commands.node import preflight
from fedrad.client.governance.audit_key import KEY_BYTES
from fedrad.client.runtime.node_config import load_node_config
from fedrad.server import provision


def test_keygen_makes_the_audit_key_beside_the_key_pair_and_keeps_it(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # arrange
    out = tmp_path / "secrets"
    # act
    rc = node_main(["keygen", "--out", str(out), "--comment", "hospital-a"])
    # assert
    key = out / "audit.key"
    assert rc == 0 and key.is_file() and not key.is_symlink()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == KEY_BYTES
    assert str(key) in capsys.readouterr().out
    # a second keygen is refused (the node key is never replaced) and the audit key is untouched
    before = key.read_bytes()
    assert node_main(["keygen", "--out", str(out)]) != 0
    assert key.read_bytes() == before


def test_keygen_keeps_an_existing_audit_key(tmp_path: Path) -> None:
    # arrange: the node already has an audit key (its log is keyed with it), but a new key pair is made
    out = tmp_path / "secrets"
    out.mkdir()
    (out / "audit.key").write_bytes(b"k" * KEY_BYTES)
    (out / "audit.key").chmod(0o600)
    # act
    rc = node_main(["keygen", "--out", str(out)])
    # assert
    assert rc == 0 and (out / "audit.key").read_bytes() == b"k" * KEY_BYTES


def test_check_names_an_unwritable_dicom_cache_with_its_fix(tmp_path: Path) -> None:
    # arrange: the DICOM cache would be created below a path that is not a folder
    (tmp_path / "not-a-folder").write_text("x")
    dicom = tmp_path / "dicom.yaml"
    dicom.write_text(yaml.safe_dump({"root": str(tmp_path / "dicom"), "label_attribute": "BodyPartExamined",
                                     "cache_dir": str(tmp_path / "not-a-folder" / "cache")}))
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text(yaml.safe_dump({"site": "h", "superlink": "127.0.0.1:1", "insecure": True,
                                         "data": {"source": "dicom", "path": str(dicom)}, "state_dir": "state"}))
    # act
    problems = dict(preflight(node_yaml, probe=False))
    # assert
    cache = [(p, fix) for p, fix in problems.items() if "DICOM cache" in p]
    assert cache and "not writable" in cache[0][0]
    assert str(tmp_path / "state" / "dicom-cache") in cache[0][1]


def test_the_kit_node_yaml_parses_and_names_the_audit_key(tmp_path: Path) -> None:
    # arrange
    fed = tmp_path / "federation.yaml"
    fed.write_text("name: t\nsuperlink: {address: 127.0.0.1, port: 1}\nhospitals: [hospital-a]\n")
    cfg = provision.load_federation(fed)
    # act
    text = provision._node_yaml(cfg, "hospital-a")
    (tmp_path / "node.yaml").write_text(text.replace("/path/to/site-data.npz", "site.npz"))
    # assert
    assert yaml.safe_load(text)["audit"] == {"key_file": "audit.key"}
    node = load_node_config(tmp_path / "node.yaml")  # unknown keys would be errors
    assert node.site == "hospital-a"
    assert node.audit.key_file == (tmp_path / "audit.key").resolve()
