"""``fedrad-node``: the hospital node's command line (one module per sub-command in :mod:`fedrad.client.commands`).

:data:`COMMANDS` is the table of sub-commands; only the module of the command being run is imported
(see :mod:`fedrad.common.cli`), so ``fedrad-node --help`` never loads torch, Opacus or Flower.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedrad.common.cli import Command, run_cli

COMMANDS: tuple[Command, ...] = (
    Command("apps", "fedrad.client.commands.apps",
            "approve, revoke and list the apps (Flower bundles) allowed to run on this node"),
    Command("audit", "fedrad.client.commands.audit", "verify or show the node's audit log of everything it sent"),
    Command("data", "fedrad.client.commands.data", "index, preview or synthesise a hospital's DICOM data"),
    Command("ledger", "fedrad.client.commands.ledger", "inspect the site's privacy ledger"),
    Command("keygen", "fedrad.client.commands.node",
            "make this node's authentication key pair (private key stays here; send the .pub)"),
    Command("check", "fedrad.client.commands.node",
            "preflight: report everything that would stop this node, each with its fix"),
    Command("start", "fedrad.client.commands.node", "join the federation as a Flower SuperNode (TLS and node key)"),
    Command("policy", "fedrad.client.commands.policy", "validate and show a node policy"),
    Command("predict", "fedrad.client.commands.predict",
            "run a study's final model on this hospital's images (nothing leaves the node)"),
    Command("explain", "fedrad.client.commands.predict",
            "saliency maps (Grad-CAM, integrated gradients) for predictions, as PNG contact sheets"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("fedrad-node", "fedrad hospital node: site data, privacy ledger, joining a federation.",
                   COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
