#!/usr/bin/env python3
"""Prepare the docker-compose demo: provision a federation and give each hospital a data share.

    python deploy/prepare-demo.py --out deploy/fed [--config deploy/federation.example.yaml]

Writes OUT/ (coordinator/, nodes/NAME/, federation-state.json) with ``fedrad provision``, cuts
the bundled PneumoniaMNIST into one ``OUT/data/NAME/site.npz`` per hospital (a demo stand-in
for each hospital's own export) and points every node.yaml at the container paths
(``/data/site.npz``, state in ``/var/lib/fedrad``). Re-running keeps existing keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from fedrad import bundled_path
    from fedrad.server.provision import Provisioner, load_federation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "fed")
    ap.add_argument("--config", type=Path, default=HERE / "federation.example.yaml")
    args = ap.parse_args(argv)
    cfg = load_federation(args.config)
    Provisioner(args.out).provision(cfg)
    with np.load(bundled_path("data", "pneumoniamnist.npz")) as d:
        arrays = {k: d[k] for k in d.files}
    n = len(cfg.hospitals)
    for i, name in enumerate(cfg.hospitals):
        share = {k: v[i::n] for k, v in arrays.items()}
        target = args.out / "data" / name
        target.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(target / "site.npz", **share)
        node_yaml = args.out / "nodes" / name / "node.yaml"
        node = yaml.safe_load(node_yaml.read_text(encoding="utf-8"))
        node["data"] = {"source": "npz", "path": "/data/site.npz"}
        node["state_dir"] = "/var/lib/fedrad"
        node_yaml.write_text(yaml.safe_dump(node, sort_keys=False), encoding="utf-8")
        print(f"{name}: kit {node_yaml.parent}, data {target / 'site.npz'} ({len(share['train_labels'])} train images)")
    print("keys are 0600 and owned by you: run compose with FEDRAD_UID=$(id -u) FEDRAD_GID=$(id -g)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
