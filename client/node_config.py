"""``node.yaml``: the hospital node's own configuration (written as a template by provisioning).

Everything here belongs to the hospital: where its data and ledger are, its certificates and
key, its privacy budget and its node policy. Nothing the coordinator sends can change it.
Relative paths resolve against the folder of ``node.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fedrad.common.config import load_yaml_model
from pydantic import BaseModel, ConfigDict, Field

from .approval import AppApprovalSettings
from .node_policy import NodePolicy


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
    delta: float = Field(1e-5, gt=0, lt=1)


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
    #: (``fedrad.client.warm``) instead of importing them per message; falls back to cold starts.
    warm_runtime: bool = True
    data: NodeData
    state_dir: Path = Path("state")
    privacy: NodePrivacy = Field(default_factory=NodePrivacy)
    policy: NodePolicy = Field(default_factory=NodePolicy)
    #: Which coordinator apps (FABs) may run on this node: by default only those on the node's
    #: allow-list (``fedrad-node apps approve``).
    apps: AppApprovalSettings = Field(default_factory=AppApprovalSettings)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"


def load_node_config(path: str | Path) -> NodeConfig:
    p = Path(path).resolve()
    cfg = load_yaml_model(p, NodeConfig)
    base = p.parent

    def rel(x: Path | None) -> Path | None:
        return None if x is None else (x if x.is_absolute() else (base / x).resolve())

    return cfg.model_copy(update={
        "root_certificates": rel(cfg.root_certificates),
        "auth_private_key": rel(cfg.auth_private_key),
        "auth_public_key": rel(cfg.auth_public_key),
        "state_dir": rel(cfg.state_dir),
        "data": cfg.data.model_copy(update={"path": rel(cfg.data.path)}),
    })
