"""``fedrad-node audit verify|show``: the node's hash-chained record of what it sent."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from fedrad.common.cli import console, err_console
from fedrad.common.errors import AuditError

from .audit_log import AuditLog


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="verify or show the node's audit log of everything it sent")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="detect edited, deleted, inserted, reordered or truncated entries")
    v.add_argument("log", type=Path, help="audit.jsonl")
    v.set_defaults(handler=run_verify)
    s = asub.add_parser("show", help="one row per message the node sent or refused")
    s.add_argument("log", type=Path, help="audit.jsonl")
    s.set_defaults(handler=run_show)


def _open(path: Path) -> AuditLog:
    if not path.exists():
        raise AuditError(f"{path}: no such audit log")
    return AuditLog(path)


def run_verify(args: argparse.Namespace) -> int:
    log = _open(args.log)
    problems = log.verify()
    if problems:
        err_console.print(f"[bold red]audit log {args.log} FAILED verification:[/]")
        for p in problems:
            err_console.print(f"  - {p}", markup=False)
        return AuditError.exit_code
    console.print(f"audit log {args.log}: {len(log.entries())} entries, hash chain intact")
    return 0


def run_show(args: argparse.Namespace) -> int:
    log = _open(args.log)
    t = Table(title=str(args.log))
    for col in ("#", "study", "round", "kind", "outcome", "arrays", "bytes", "epsilon before", "epsilon after", "policy"):
        t.add_column(col, justify="right")
    for e in log.entries():
        if "_malformed_line" in e:
            t.add_row(str(e["_malformed_line"]), "[red]malformed[/]", *[""] * 8)
            continue
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        t.add_row(str(e["seq"]), str(e["study"])[:10], str(e["round"]), e["kind"], e["outcome"][:40],
                  str(len(e["arrays"])), str(e["bytes_sent"]), fmt(e["epsilon_before"]), fmt(e["epsilon_after"]),
                  (e["policy_version"] or "-")[:10])
    console.print(t)
    return 0
