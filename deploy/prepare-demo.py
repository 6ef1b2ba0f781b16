#!/usr/bin/env python3
"""Prepare the docker-compose demo: each hospital makes its key, the coordinator provisions with public keys.

    python deploy/prepare-demo.py [--out deploy/fed] [--sites deploy/sites] [--state deploy/state]
                                  [--config deploy/federation.example.yaml]

Plays both sides of the real key ceremony on one machine (a demo convenience only):

1. every hospital makes its own key pair in its own folder, ``SITES/NAME/`` (``fedrad-node keygen``);
2. the coordinator provisions ``OUT/`` (``fedrad provision``) with the hospitals' PUBLIC keys only, so
   ``OUT/`` (mounted into the coordinator container) never holds a hospital's private key;
3. each hospital copies its kit (``OUT/nodes/NAME/``: ca.pem, node.yaml, launch script) into
   ``SITES/NAME/`` beside its key, gets a share of the bundled PneumoniaMNIST as ``SITES/NAME/data/site.npz``
   (a stand-in for its own export), and points node.yaml at the container paths (``/data/site.npz``,
   state in ``/var/lib/fedrad``);
4. makes each service's state folder ``STATE/NAME/`` (0700; bind-mounted at /var/lib/fedrad).

Everything belongs to the user running this script, which is the user the containers run as
(``FEDRAD_UID=$(id -u)``). Run as root, it gives everything to uid/gid 10001 (the images' service
account), because the containers never run as root. Re-running keeps existing keys and kits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from fedrad import bundled_path
    from fedrad.client.commands.node import make_audit_key
    from fedrad.client.runtime.node_keys import PRIVATE_NAME, PUBLIC_NAME, generate
    from fedrad.server.provision import Provisioner, load_federation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "fed", help="the coordinator's provisioning folder")
    ap.add_argument("--sites", type=Path, default=HERE / "sites", help="one folder per hospital (its own machine)")
    ap.add_argument("--state", type=Path, default=HERE / "state", help="one state folder per service")
    ap.add_argument("--config", type=Path, default=HERE / "federation.example.yaml")
    args = ap.parse_args(argv)
    cfg = load_federation(args.config)
    public: dict[str, Path] = {}
    for name in cfg.names:  # 1. the hospitals, each on its own machine
        site = args.sites / name
        if not (site / PRIVATE_NAME).exists():
            pair = generate(site, comment=name)
            print(f"{name}: made its key pair ({pair.fingerprint})")
        if not (site / "audit.key").exists():
            make_audit_key(site)  # the audit log's key, beside node.yaml (its default place), 0600
        public[name] = site / PUBLIC_NAME
    Provisioner(args.out).provision(cfg, public_keys=public)  # 2. the coordinator: public keys only
    with np.load(bundled_path("data", "pneumoniamnist.npz")) as d:
        arrays = {k: d[k] for k in d.files}
    n = len(cfg.names)
    for i, name in enumerate(cfg.names):  # 3. each hospital installs its kit beside its key
        site = args.sites / name
        kit = args.out / "nodes" / name
        for f in ("ca.pem", "fedrad-node.sh"):
            if (kit / f).exists():
                shutil.copy2(kit / f, site / f)
        node = yaml.safe_load((kit / "node.yaml").read_text(encoding="utf-8"))
        node["data"] = {"source": "npz", "path": "/data/site.npz"}
        node["state_dir"] = "/var/lib/fedrad"
        (site / "node.yaml").write_text(yaml.safe_dump(node, sort_keys=False), encoding="utf-8")
        share = {k: v[i::n] for k, v in arrays.items()}
        (site / "data").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(site / "data" / "site.npz", **share)
        print(f"{name}: site {site} (kit + own key), data {site / 'data' / 'site.npz'} "
              f"({len(share['train_labels'])} train images)")
    for name in ("coordinator", *cfg.names):  # 4. state folders, bind-mounted at /var/lib/fedrad
        (args.state / name).mkdir(parents=True, exist_ok=True)
        (args.state / name).chmod(0o700)
    if os.geteuid() == 0:
        for root in (args.out, args.sites, args.state):
            _give(root, SERVICE_UID)
        print(f"run as root: {args.out}, {args.sites} and {args.state} now belong to uid/gid {SERVICE_UID} "
              "(the containers never run as root)")
    else:
        print("keys are 0600 and owned by you: run compose with FEDRAD_UID=$(id -u) FEDRAD_GID=$(id -g)")
    return 0


#: The images' service account (uid and gid).
SERVICE_UID = 10001


def _give(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for folder, dirs, files in os.walk(root):
        for n in (*dirs, *files):
            os.chown(Path(folder) / n, uid, uid, follow_symlinks=False)


if __name__ == "__main__":
    sys.exit(main())
