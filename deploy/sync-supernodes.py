#!/usr/bin/env python3
"""Make the SuperLink's registered SuperNodes match the provisioning folder.

Flower 1.41 SuperLinks started with ``--enable-supernode-auth`` accept a SuperNode only once its
public key is registered through the Control API (``flwr supernode register``). This script:

* registers every hospital public key in ``OUT/coordinator/supernodes/*.pub`` not registered yet;
* unregisters every hospital that ``federation-state.json`` lists as revoked;
* keeps ``OUT/coordinator/registered-supernodes.json`` (hospital -> Flower node id), because
  ``flwr supernode list`` does not show which key a node id belongs to.

Run it on the coordinator after ``fedrad provision`` / ``add-node`` / ``revoke``, with a Flower
CLI connection (``$FLWR_HOME/config.toml``) that points at the SuperLink with the federation CA:

    [superlink]
    default = "fedrad"
    [superlink.fedrad]
    address = "coordinator.example.org:8000"
    root-certificates = "/etc/fedrad/coordinator/ca.pem"

Usage: sync-supernodes.py --out DIR [--connection fedrad] [--dry-run]
Exit status: 0 all in sync, 1 a flwr call failed (the registry keeps what succeeded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _flwr(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, check=False)
    text = proc.stdout
    start = text.find("{")
    try:
        reply = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success", False):
        detail = (reply.get("error-message") or proc.stderr or text).strip()
        raise RuntimeError(f"flwr {' '.join(args)} failed: {detail}")
    return reply


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def plan(out: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, int]]]:
    """(to register: name, key file), (to unregister: name, node id)."""
    state = json.loads((out / "federation-state.json").read_text(encoding="utf-8"))
    reg_path = out / "coordinator" / "registered-supernodes.json"
    registered = json.loads(reg_path.read_text(encoding="utf-8")) if reg_path.exists() else {}
    keys = sorted((out / "coordinator" / "supernodes").glob("*.pub"))
    add = [(k.stem, k) for k in keys if k.stem in state["hospitals"] and k.stem not in registered]
    drop = [(n, int(info["node_id"])) for n, info in sorted(registered.items()) if n in state["revoked"]]
    return add, drop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="provisioning folder (fedrad provision --out)")
    ap.add_argument("--connection", default="fedrad", help="Flower CLI SuperLink connection name")
    ap.add_argument("--dry-run", action="store_true", help="show what would change")
    args = ap.parse_args(argv)
    reg_path = args.out / "coordinator" / "registered-supernodes.json"
    add, drop = plan(args.out)
    if args.dry_run:
        for name, key in add:
            print(f"would register {name} ({key})")
        for name, node_id in drop:
            print(f"would unregister {name} (node id {node_id})")
        return 0
    registered = json.loads(reg_path.read_text(encoding="utf-8")) if reg_path.exists() else {}
    failed = False
    for name, key in add:
        try:
            reply = _flwr(["supernode", "register", str(key), args.connection, "--name", name])
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        registered[name] = {"node_id": int(reply["node-id"]), "public_key": key.name}
        _save(reg_path, registered)
        print(f"registered {name}: node id {reply['node-id']}")
    for name, node_id in drop:
        try:
            _flwr(["supernode", "unregister", str(node_id), args.connection])
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        registered.pop(name, None)
        _save(reg_path, registered)
        print(f"unregistered revoked {name} (node id {node_id})")
    if not add and not drop:
        print("SuperLink registrations already match the provisioning folder")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
