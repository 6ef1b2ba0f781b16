"""``fedrad-node ledger show``: what a site's privacy ledger holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedrad.common.cli import console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ledger", help="inspect the site's privacy ledger")
    lsub = p.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    show = lsub.add_parser("show", help="epsilon spent per account, the node's study records and every reservation")
    show.add_argument("path", type=Path, help="privacy-ledger.json")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    from rich.table import Table  # heavy imports only when the command runs (help starts at once)

    from fedrad.client.privacy.ledger import ACCOUNTS, PrivacyLedger

    path: Path = args.path
    ledger = PrivacyLedger.load(path)
    spent = {account: ledger.spent(account) for account in ACCOUNTS}  # type: ignore[arg-type]
    if args.json:
        console.print_json(json.dumps({
            "epsilon": spent["train"], "epsilon_val": spent["val"], "budget": ledger.budget, "delta": ledger.delta,
            "accountant": ledger.accountant, "released_size": ledger.released_size,
            "studies": [r.__dict__ for r in ledger.studies], "entries": ledger.entries,
        }))
        return 0
    console.print(f"{path}: epsilon {spent['train']:.4f} (training) and {spent['val']:.4f} (validation) of "
                  f"{ledger.budget:g} each (delta {ledger.delta:g}, {ledger.accountant} accountant); the splits are "
                  "disjoint, so a patient's guarantee is the larger of the two")
    if ledger.released_size is not None:
        console.print(f"training-set size released (DP, once): {ledger.released_size}")
    if ledger.studies:
        st = Table(title="studies (the node's own record)")
        for col in ("study", "name", "rounds", "evaluations"):
            st.add_column(col, justify="right")
        for r in ledger.studies:
            st.add_row(r.key[:16], r.name, f"{r.train_rounds}/{r.planned_rounds}",
                       f"{r.evaluations}/{r.planned_evaluations}")
        console.print(st)
    t = Table()
    for col in ("account", "study", "round", "steps", "noise multiplier", "sample rate", "epsilon before",
                "epsilon after"):
        t.add_column(col, justify="right")
    for e in ledger.entries:
        t.add_row(str(e.get("account", "train")), str(e["study"])[:16], str(e["round"]), str(e["steps"]),
                  f"{e['noise_multiplier']:.3f}", f"{e['sample_rate']:.4f}", _num(e.get("epsilon_before")),
                  _num(e.get("epsilon_after")))
    console.print(t)
    return 0


def _num(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "?"
