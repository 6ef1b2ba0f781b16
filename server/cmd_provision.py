"""``fedrad provision``: the federation's CA, the SuperLink certificate, node kits, hospitals' public keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fedrad.common.cli import console

if TYPE_CHECKING:
    from fedrad.server.provision import FederationConfig, Provisioner


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision",
        help="create or extend a federation's certificates and node kits",
        description="Without an action: create the CA, the SuperLink TLS certificate and a node kit (ca.pem, "
        "node.yaml, launch script; never a private key) for every hospital in --config that has none yet, and "
        "record the public keys the config names (nothing existing is re-issued). Each hospital makes its own "
        "key pair with `fedrad-node keygen` and sends only its public key.",
    )
    p.add_argument("--config", type=Path, help="federation.yaml (name, superlink, hospitals)")
    p.add_argument("--out", type=Path, required=True, help="provisioning folder")
    p.set_defaults(handler=run_provision)
    psub = p.add_subparsers(dest="provision_action", metavar="ACTION")
    a = psub.add_parser("add-node", help="add a hospital (its kit) and/or record its PUBLIC key")
    a.add_argument("name")
    a.add_argument("--public-key", type=Path,
                   help="the hospital's node-auth.pub from `fedrad-node keygen` (never its private key)")
    a.set_defaults(handler=run_add)
    r = psub.add_parser("revoke", help="revoke a hospital: its key is no longer registered")
    r.add_argument("name")
    r.add_argument("--reason", default="")
    r.set_defaults(handler=run_revoke)
    n = psub.add_parser("renew-superlink", help="re-issue the SuperLink certificate (expired, or new names)")
    n.set_defaults(handler=run_renew)


def _cfg(args: argparse.Namespace) -> FederationConfig:
    from fedrad.common.errors import ConfigError
    from fedrad.server.provision import load_federation

    if args.config is None:
        raise ConfigError("<command line>", ["--config: required for this action (got nothing)"])
    return load_federation(args.config)


def _report_keys(prov: Provisioner) -> None:
    import json

    state = json.loads(prov.state_path.read_text(encoding="utf-8"))
    for name, info in sorted(state["hospitals"].items()):
        console.print(f"  {name}: public key {info.get('fingerprint', '?')} (registered when the coordinator "
                      "starts or on `fedrad coordinator register`)", markup=False)
    for name in prov.pending():
        console.print(f"  {name}: waiting for its public key (the hospital runs `fedrad-node keygen --out DIR` and "
                      f"sends DIR/node-auth.pub; then `fedrad provision --config ... --out {prov.out} add-node {name} "
                      "--public-key node-auth.pub`)", markup=False)


def run_provision(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    prov = Provisioner(args.out)
    issued = prov.provision(_cfg(args))
    console.print(f"provisioned {args.out}: new node kits: {', '.join(issued) or 'none'}", markup=False)
    _report_keys(prov)
    console.print(f"  keep {args.out / 'coordinator' / 'ca.key'} on the coordinator only; "
                  f"hand nodes/<name>/ to each hospital (it holds no secret)", markup=False)
    return 0


def run_add(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    prov = Provisioner(args.out)
    changed = prov.add_node(_cfg(args), args.name, public_key=args.public_key)
    console.print(f"{args.name}: {'updated' if changed else 'already provisioned (unchanged)'}", markup=False)
    _report_keys(prov)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    Provisioner(args.out).revoke(args.name, reason=args.reason)
    console.print(f"revoked {args.name}: its public key is removed from {args.out / 'coordinator' / 'supernodes'}; "
                  "run `fedrad coordinator register` (or restart the coordinator) to unregister it now", markup=False)
    return 0


def run_renew(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    Provisioner(args.out).renew_superlink(_cfg(args))
    console.print(f"re-issued {args.out / 'coordinator' / 'superlink.pem'}; restart the coordinator "
                  "(node kits are unchanged)", markup=False)
    return 0
