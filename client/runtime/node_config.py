"""``node.yaml``: the hospital node's own configuration (written as a template by provisioning).

Everything here belongs to the hospital: where its data and ledger are, its certificates and
key, its privacy budget and its node policy. Nothing the coordinator sends can change it.
Relative paths resolve against the folder of ``node.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedrad.client.governance.approval import AppApprovalSettings
from fedrad.client.governance.node_policy import NodePolicy
from fedrad.common.config import load_yaml_model
from fedrad.common.errors import ConfigError

#: Key of the SuperNode ``--node-config`` entry that names the node's node.yaml.
NODE_CONFIG_KEY = "fedrad-node-config"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeData(_Frozen):
    source: Literal["npz", "dicom"] = "npz"
    #: npz: a MedMNIST-style archive (train/val splits are used); dicom: a DICOM settings YAML.
    path: Path


class NodePrivacy(_Frozen):
    #: The dataset's lifetime budget, composed over every study that trains on it (each study is
    #: also held to the epsilon it asks for). The default matches the node policy's lifetime limit.
    epsilon: float = Field(20.0, gt=0, description="this dataset's lifetime budget, owned by the hospital")
    #: The node's delta: every epsilon on this node's ledger is evaluated at it (a study asking for
    #: a larger delta is held to this one; a study asking for a smaller one gets its own epsilon
    #: evaluated at its smaller delta).
    delta: float = Field(1e-5, gt=0, lt=1)
    #: The node's accountant (both are sound; the ledger's history can be evaluated with either).
    accountant: Literal["rdp", "prv"] = "rdp"


class NodeEvaluation(_Frozen):
    #: Evaluations (noisy histogram releases) a study may have on this node. None: the study's
    #: rounds + 1. A smaller number gives each release less noise (the study's budget is shared
    #: by fewer of them).
    max_per_study: int | None = Field(None, ge=1)


class NodeAudit(_Frozen):
    #: The key of the node's HMAC-chained audit log. None: ``audit.key`` beside node.yaml. It may
    #: not live inside ``state_dir`` (whoever can rewrite the state folder must not hold the key).
    key_file: Path | None = None


class NodeConfig(_Frozen):
    site: str
    superlink: str = Field(..., description="host:port of the coordinator's SuperLink Fleet API")
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    auth_public_key: Path | None = None
    insecure: bool = False
    #: Port of this SuperNode's local Runtime API (127.0.0.1 only); one per node on a shared host.
    runtime_port: int = Field(9094, ge=1, le=65535)
    #: Give up reconnecting to the SuperLink after this long (None: keep trying, survives coordinator restarts).
    max_wait_time_s: float | None = Field(None, gt=0)
    #: Seconds between the SuperNode's polls for work (None: Flower's default, 3 s). Lower = less
    #: idle time per round, more (tiny) requests to the coordinator.
    poll_interval_s: float | None = Field(None, ge=0.05, le=60)
    #: After the SuperNode is refused or drops out (e.g. restarted right after a crash, while the
    #: coordinator still counts the old connection as online), keep restarting it this long.
    rejoin_timeout_s: float = Field(300.0, ge=0)
    #: Start each ClientApp task from a process that has torch, Opacus and fedrad already imported
    #: (``fedrad.client.runtime.warm``) instead of importing them per message; falls back to cold starts.
    warm_runtime: bool = True
    data: NodeData
    state_dir: Path = Path("state")
    privacy: NodePrivacy = Field(default_factory=NodePrivacy)
    policy: NodePolicy = Field(default_factory=NodePolicy)
    #: Which coordinator apps (FABs) may run on this node: by default only those on the node's
    #: allow-list (``fedrad-node apps approve``).
    apps: AppApprovalSettings = Field(default_factory=AppApprovalSettings)
    evaluation: NodeEvaluation = Field(default_factory=NodeEvaluation)
    audit: NodeAudit = Field(default_factory=NodeAudit)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"


def load_node_config(path: str | Path) -> NodeConfig:
    p = Path(path).resolve()
    cfg = load_yaml_model(p, NodeConfig)
    base = p.parent

    def rel(x: Path | None) -> Path | None:
        return None if x is None else (x if x.is_absolute() else (base / x).resolve())

    state_dir = rel(cfg.state_dir)
    key_file = rel(cfg.audit.key_file) or (base / "audit.key")
    assert state_dir is not None
    if key_file.resolve().is_relative_to(state_dir.resolve()):
        raise ConfigError(str(p), [f"{p}: audit.key_file: must not be inside state_dir {state_dir} (got {str(key_file)!r})"])
    return cfg.model_copy(update={
        "root_certificates": rel(cfg.root_certificates),
        "auth_private_key": rel(cfg.auth_private_key),
        "auth_public_key": rel(cfg.auth_public_key),
        "state_dir": state_dir,
        "data": cfg.data.model_copy(update={"path": rel(cfg.data.path)}),
        "audit": cfg.audit.model_copy(update={"key_file": key_file}),
    })
