"""``fedrad-node ledger show``: what a site's privacy ledger holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from fedrad.common.cli import console

from .ledger import PrivacyLedger


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ledger", help="inspect the site's privacy ledger")
    lsub = p.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    show = lsub.add_parser("show", help="epsilon spent and every reservation in a ledger file")
    show.add_argument("path", type=Path, help="privacy-ledger.json")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    path: Path = args.path
    ledger = PrivacyLedger.load(path)
    spent = ledger.spent()
    if args.json:
        console.print_json(json.dumps({"epsilon": spent, "budget": ledger.budget, "delta": ledger.delta,
                                       "accountant": ledger.accountant, "entries": ledger.entries}))
        return 0
    console.print(f"{path}: epsilon {spent:.4f} of {ledger.budget:g} spent (delta {ledger.delta:g}, "
                  f"{ledger.accountant} accountant)")
    t = Table()
    for col in ("study", "round", "steps", "noise multiplier", "sample rate", "epsilon before", "epsilon after"):
        t.add_column(col, justify="right")
    for e in ledger.entries:
        t.add_row(str(e["study"]), str(e["round"]), str(e["steps"]), f"{e['noise_multiplier']:.3f}",
                  f"{e['sample_rate']:.4f}", f"{e['epsilon_before']:.3f}", f"{e['epsilon_after']:.3f}")
    console.print(t)
    return 0
