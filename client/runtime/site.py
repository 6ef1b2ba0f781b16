"""Which hospital this ClientApp is, and its data and ledger location.

* Simulation: Flower gives each virtual SuperNode a ``partition-id``; the hospital's share of
  the study's data set is cut deterministically from it, and its ledger lives under the state
  folder the simulation names.
* Deployment: the node's own ``node.yaml`` (see :mod:`fedrad.client.runtime.node_config`) says where
  the site's data and ledger are; nothing the coordinator sends can move them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrad.client.governance.node_policy import NodePolicy, load_policy
from fedrad.common.config import PrivacyConfig, StudyConfig
from fedrad.common.datasets import ImageSplit, SiteData, load_npz, npz_source_path
from fedrad.common.errors import DataError
from fedrad.common.partition import partition_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData
    ledger_path: Path
    #: Identifies the dataset a ledger accounts for (a hash; never PHI).
    dataset_id: str
    partition_id: int | None = None
    #: The hospital's node policy; None = no policy enforced (a simulation without one).
    policy: "NodePolicy | None" = None
    #: The hospital's own lifetime (epsilon, delta) budget for this dataset (deployment: node.yaml),
    #: over every study; each study is also held to its own epsilon. None: the study's (simulation).
    budget: tuple[float, float] | None = None
    #: The node's accountant (deployment: node.yaml ``privacy.accountant``); None: the study's.
    accountant: str | None = None
    #: Most evaluations a study may have here (node.yaml ``evaluation.max_per_study``); None: no
    #: node limit (the study's rounds + 1 applies).
    max_evaluations: int | None = None
    #: Key of the node's keyed audit chain (deployment: node.yaml ``audit.key_file``, outside the
    #: state folder); None: ``audit.key`` in the site's state folder (simulation).
    audit_key: Path | None = None

    def ledger_budget(self, privacy: PrivacyConfig) -> tuple[float, float]:
        """(epsilon, delta) of the ledger: the dataset's lifetime budget and the node's delta, the
        site's own when it has them (node.yaml ``privacy``), else the study's (a simulated site
        lives for one study). Each study is also held to its own epsilon, at the smaller of its
        delta and the node's (:func:`fedrad.client.privacy.budget.study_delta`)."""
        if self.budget is None:
            return privacy.epsilon, privacy.delta
        return self.budget[0], self.budget[1]

    def ledger_accountant(self, privacy: PrivacyConfig) -> str:
        """The accountant every epsilon on the ledger is evaluated with: the node's, else the study's."""
        return self.accountant or privacy.accountant

    def planned_evaluations(self, study: StudyConfig) -> int:
        """How many evaluations (noisy releases) of the validation data a study may have here."""
        planned = study.federation.rounds + 1
        return planned if self.max_evaluations is None else min(planned, self.max_evaluations)

    @property
    def audit_path(self) -> Path:
        """The node's hash-chained audit log, beside its privacy ledger."""
        return self.ledger_path.parent / "audit.jsonl"

    @property
    def audit_key_file(self) -> Path:
        """The audit chain's key file (created on first use by :class:`~fedrad.client.governance.audit_log.AuditLog`)."""
        return self.audit_key if self.audit_key is not None else self.ledger_path.parent / "audit.key"


@functools.lru_cache(maxsize=4)
def _load_npz_cached(path: str, channels: int, image_size: int) -> dict[str, ImageSplit]:
    return load_npz(path, channels=channels, image_size=image_size)


def _cap(split: ImageSplit, cap: int | None, seed: int) -> ImageSplit:
    if cap is None or len(split) <= cap:
        return split
    rng = np.random.default_rng(seed)
    return split.subset(rng.choice(len(split), size=cap, replace=False))


def simulated_site_data(study: StudyConfig, *, partition_id: int, num_partitions: int) -> SiteData:
    """The share of the study's data set that simulated hospital ``partition_id`` holds."""
    data = study.data
    fed = study.federation
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    if data.source == "dicom":
        return _simulated_dicom_site(study, partition_id=partition_id)
    splits = _load_npz_cached(str(npz_source_path(data.path)), data.channels, data.image_size)
    out = {}
    for i, name in enumerate(("train", "val")):
        parts = partition_indices(
            splits[name].labels,
            num_parts=num_partitions,
            scheme=data.partition.scheme,
            alpha=data.partition.alpha,
            seed=fed.seed + i,
            min_per_part=data.partition.min_per_hospital if name == "train" else 1,
        )
        cap = data.max_train_per_hospital if name == "train" else data.max_val_per_hospital
        out[name] = _cap(splits[name].subset(parts[partition_id]), cap, fed.seed + 100 * partition_id + i)
    num_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    names = data.class_names or tuple(f"class-{k}" for k in range(num_classes))
    return SiteData(train=out["train"], val=out["val"], class_names=tuple(names), origin=npz_source_path(data.path).name)


def _simulated_dicom_site(study: StudyConfig, *, partition_id: int) -> SiteData:
    from fedrad.client.dicom.dataset import load_simulated_site  # optional heavy import

    assert study.data.path is not None
    return load_simulated_site(Path(study.data.path) / f"hospital-{partition_id + 1}", study=study)


def dataset_fingerprint(data: SiteData) -> str:
    """A content hash of the training set: the ledger's dataset identity."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.train.labels).tobytes())
    h.update(str(data.train.images.shape).encode())
    step = max(1, len(data.train) // 64)
    h.update(np.ascontiguousarray(data.train.images[::step]).tobytes())
    return h.hexdigest()[:16]


def simulated_site(study: StudyConfig, *, partition_id: int, num_partitions: int, state_dir: Path) -> Site:
    data = simulated_site_data(study, partition_id=partition_id, num_partitions=num_partitions)
    name = f"hospital-{partition_id + 1}"
    return Site(
        name=name,
        data=data,
        ledger_path=state_dir / name / "privacy-ledger.json",
        dataset_id=dataset_fingerprint(data),
        partition_id=partition_id,
        policy=load_policy(study.simulation.node_policy) if study.simulation.node_policy else None,
    )
