"""``fedrad-node policy show``: the node policy the hospital enforces, and its version hash."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedrad.common.cli import console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="validate and show a node policy")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    s = psub.add_parser("show", help="validate a policy file and print its rules and version")
    s.add_argument("policy", type=Path, help="policy YAML (standalone or under a 'policy:' key)")
    s.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    from fedrad.client.governance.node_policy import load_policy  # heavy imports only when the command runs

    policy = load_policy(args.policy)
    console.print(f"policy {args.policy} (version {policy.version()[:16]}):")
    for key, value in policy.model_dump().items():
        console.print(f"  {key}: {value}", markup=False)
    return 0
