"""Helpers for the adversarial-coordinator tests of the hospital node (issue 9, points 1-4 and 9).

The "coordinator" here is the test: it crafts Flower Messages as a curious or malicious
coordinator could (any config values, any weights) and hands them to the real ClientApp
functions (:func:`fedrad.client.runtime.app.train` / :func:`~fedrad.client.runtime.app.evaluate_global`) with a
simulated or deployed Context. Also a sanity test that the kit itself builds what it says.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedrad.common.config import StudyConfig, parse_study
from fedrad.common.models import build_model
from tests.conftest import small_study_dict

SIZE = 28


def study(**over: Any) -> StudyConfig:
    """A small DP study (3 hospitals, 2 rounds, 64 training / 32 validation images each)."""
    return parse_study(json.loads(json.dumps(small_study_dict(**over))))


def global_arrays(s: StudyConfig, seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    m = build_model(s.model.name, in_channels=s.data.channels, num_classes=2, image_size=SIZE, options=s.model.options)
    return ArrayRecord(m.state_dict())


def message(s: StudyConfig, kind: str, state_dir: Path | None, *, server_round: int = 1, total: int | None = None,
            study_id: str = "unit-study", offset: int = 0, arrays: ArrayRecord | None = None) -> Message:
    """What a coordinator sends: every number in it is the coordinator's claim."""
    cfg: dict[str, Any] = {"study": s.to_json(), "server-round": server_round,
                           "total-rounds": s.federation.rounds if total is None else total,
                           "study-id": study_id, "round-offset": offset}
    if state_dir is not None:
        cfg["sim-state-dir"] = str(state_dir)
    content = RecordDict({"arrays": arrays if arrays is not None else global_arrays(s), "config": ConfigRecord(cfg)})
    md = Metadata(run_id=77, message_id=f"msg-{kind}-{time.time_ns()}", src_node_id=0, dst_node_id=1001,
                  reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=DEFAULT_TTL,
                  message_type=kind)
    return Message(content=content, metadata=md)


def sim_context(partition: int = 0) -> Context:
    return Context(run_id=77, node_id=1001, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def ledger_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def sim_ledger(state_dir: Path, hospital: int = 1) -> dict[str, Any]:
    return ledger_json(state_dir / f"hospital-{hospital}" / "privacy-ledger.json")


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([np.asarray(a.numpy(), dtype=np.float64).ravel() for _, a in sorted(arrays.items())])


def deployed_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **node_over: Any) -> tuple[Path, Context]:
    """A deployed hospital node (its own node.yaml and small npz data), behind an approved gate."""
    from fedrad.client.runtime.gate import GATE_APPROVED_ENV
    from fedrad.client.runtime.node_config import NODE_CONFIG_KEY

    rng = np.random.default_rng(7)
    arrays = {}
    for name, n in (("train", 64), ("val", 32), ("test", 8)):
        arrays[f"{name}_images"] = rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8)
        arrays[f"{name}_labels"] = np.arange(n, dtype=np.int64).reshape(n, 1) % 2
    node_dir = tmp_path / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    np.savez(node_dir / "site.npz", **arrays)
    cfg: dict[str, Any] = {"site": "hospital-a", "superlink": "127.0.0.1:9092", "insecure": True,
                           "data": {"source": "npz", "path": "site.npz"}, "state_dir": "state",
                           "policy": {"min_hospitals": 1}, **node_over}
    node_yaml = node_dir / "node.yaml"
    node_yaml.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    monkeypatch.setenv(GATE_APPROVED_ENV, "1")
    ctx = Context(run_id=77, node_id=2002, node_config={NODE_CONFIG_KEY: str(node_yaml)}, state=RecordDict(),
                  run_config={})
    return node_yaml, ctx


def test_kit_builds_a_working_simulated_and_deployed_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrad.client.runtime import app as client_app
    s = study()
    sim = client_app.train(message(s, "train", tmp_path / "sim"), sim_context())
    node_yaml, ctx = deployed_node(tmp_path, monkeypatch)
    dep = client_app.train(message(s, "train", None), ctx)

    assert not sim.has_error(), sim.error.reason if sim.has_error() else None
    assert not dep.has_error(), dep.error.reason if dep.has_error() else None
    assert (node_yaml.parent / "state" / "privacy-ledger.json").exists()


def test_node_yaml_audit_key_defaults_beside_it_and_is_refused_inside_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedrad.client.runtime.node_config import load_node_config
    from fedrad.common.errors import ConfigError

    node_yaml, _ = deployed_node(tmp_path / "a", monkeypatch)
    assert load_node_config(node_yaml).audit.key_file == node_yaml.parent / "audit.key"

    bad_yaml, _ = deployed_node(tmp_path / "b", monkeypatch, audit={"key_file": "state/audit.key"})
    with pytest.raises(ConfigError) as err:
        load_node_config(bad_yaml)
    assert "audit.key_file" in str(err.value) and "state" in str(err.value)
