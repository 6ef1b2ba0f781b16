"""The deployed hospital: its Site from its own ``node.yaml`` (found through the SuperNode's node config)."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import Context

from fedrad.common.config import StudyConfig
from fedrad.common.datasets import SiteData, load_npz
from fedrad.common.errors import DataError, ProtocolError

from .node_config import NodeConfig, load_node_config
from .site import Site, dataset_fingerprint

#: Key of the SuperNode ``--node-config`` entry that names the node's node.yaml.
NODE_CONFIG_KEY = "fedrad-node-config"


@functools.lru_cache(maxsize=2)
def _site_data(source: str, path: Path, channels: int, image_size: int, class_names: tuple[str, ...] | None) -> SiteData:
    if source == "npz":
        splits = load_npz(path, channels=channels, image_size=image_size)
        k = int(max(splits["train"].labels.max(), splits["val"].labels.max())) + 1
        names = class_names or tuple(f"class-{i}" for i in range(k))
        return SiteData(train=splits["train"], val=splits["val"], class_names=tuple(names), origin=path.name)
    from .dicom.config import load_dicom_config
    from .dicom.dataset import load_dicom_site

    return load_dicom_site(load_dicom_config(path), progress=False)


def load_site(node: NodeConfig, *, channels: int, image_size: int, class_names: tuple[str, ...] | None) -> Site:
    if not node.data.path.exists():
        raise DataError(f"{node.data.path}: the node's data ({node.data.source}) does not exist")
    data = _site_data(node.data.source, node.data.path, channels, image_size, class_names)
    return Site(name=node.site, data=data, ledger_path=node.ledger_path, dataset_id=dataset_fingerprint(data),
                policy=node.policy)


def deployed_site(context: Context, study: StudyConfig) -> Site:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        raise ProtocolError(f"this SuperNode was started without --node-config '{NODE_CONFIG_KEY}=\"...node.yaml\"'")
    node = load_node_config(str(path))
    return load_site(node, channels=study.data.channels, image_size=study.data.image_size,
                     class_names=study.data.class_names)
