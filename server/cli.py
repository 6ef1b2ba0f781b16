"""``fedrad``: the coordinator's command line (sub-commands live in ``cmd_*.py`` modules).

:data:`COMMANDS` is the table of sub-commands; only the module of the command being run is imported
(see :mod:`fedrad.common.cli`), so ``fedrad --help`` never loads torch, Opacus or Flower.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedrad.common.cli import Command, run_cli

COMMANDS: tuple[Command, ...] = (
    Command("coordinator", "fedrad.server.cmd_coordinator",
            "run the coordinator (Flower SuperLink with TLS and node authentication)", flower=True),
    Command("provision", "fedrad.server.cmd_provision", "create or extend a federation's certificates and node kits"),
    Command("run", "fedrad.server.cmd_run", "submit a study to the running coordinator and follow it", flower=True),
    Command("status", "fedrad.server.cmd_run", "the coordinator, its hospitals (online or not) and its runs",
            flower=True),
    Command("logs", "fedrad.server.cmd_run", "the ServerApp log of a run (default: the latest)", flower=True),
    Command("stop", "fedrad.server.cmd_run", "stop a run (default: the one running)", flower=True),
    Command("simulate", "fedrad.server.cmd_simulate",
            "run a simulated federation (default: the bundled PneumoniaMNIST demo)", flower=True),
    Command("report", "fedrad.server.cmd_report", "build a run folder's study report (report.html, report.md)"),
    Command("sweep", "fedrad.server.cmd_sweep",
            "run a study once per value of one field (e.g. --lr 0.01 0.03 0.1) and plot them together", flower=True),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("fedrad", "fedrad coordinator: provision, simulate and run federated DP studies.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
