"""``fedrad provision``: the federation's CA, the SuperLink certificate and per-hospital node kits."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedrad.common.cli import console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision",
        help="create or extend a federation's certificates and node kits",
        description="Without an action: create the CA, the SuperLink TLS certificate and a node kit for "
        "every hospital in --config that has none yet (nothing existing is re-issued).",
    )
    p.add_argument("--config", type=Path, help="federation.yaml (name, superlink, hospitals)")
    p.add_argument("--out", type=Path, required=True, help="provisioning folder")
    p.set_defaults(handler=run_provision)
    psub = p.add_subparsers(dest="provision_action", metavar="ACTION")
    a = psub.add_parser("add-node", help="issue a node kit for one more hospital")
    a.add_argument("name")
    a.set_defaults(handler=run_add)
    r = psub.add_parser("revoke", help="revoke a hospital: its key is no longer registered")
    r.add_argument("name")
    r.add_argument("--reason", default="")
    r.set_defaults(handler=run_revoke)
    n = psub.add_parser("renew-superlink", help="re-issue the SuperLink certificate (expired, or new names)")
    n.set_defaults(handler=run_renew)


def _cfg(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fedrad.common.errors import ConfigError
    from fedrad.server.provision import load_federation

    if args.config is None:
        raise ConfigError("<command line>", ["--config: required for this action (got nothing)"])
    return load_federation(args.config)


def run_provision(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    prov = Provisioner(args.out)
    issued = prov.provision(_cfg(args))
    console.print(f"provisioned {args.out}: new node kits: {', '.join(issued) or 'none'}")
    console.print(f"  keep {args.out / 'coordinator' / 'ca.key'} on the coordinator only; "
                  f"hand nodes/<name>/ to each hospital")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    added = Provisioner(args.out).add_node(_cfg(args), args.name)
    console.print(f"node kit for {args.name}: {'issued' if added else 'already exists (unchanged)'}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    Provisioner(args.out).revoke(args.name, reason=args.reason)
    console.print(f"revoked {args.name}: its public key is removed from {args.out / 'coordinator' / 'supernodes'}")
    return 0


def run_renew(args: argparse.Namespace) -> int:
    from fedrad.server.provision import Provisioner

    Provisioner(args.out).renew_superlink(_cfg(args))
    console.print(f"re-issued {args.out / 'coordinator' / 'superlink.pem'}; restart the coordinator "
                  "(node kits are unchanged)")
    return 0
