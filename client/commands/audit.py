"""``fedrad-node audit verify|show``: the node's chained record of what it sent."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fedrad.common.cli import console, err_console
from fedrad.common.errors import AuditError, ConfigError

if TYPE_CHECKING:  # the audit log module pulls in the wire protocol (Flower): imported when a command runs
    from fedrad.client.governance.audit_log import AuditLog, AuditReport

#: What a keyed verification detects and what it cannot (printed by ``audit verify``).
KEYED_SCOPE = (
    "detects, by anyone without the node's audit key: any edited, inserted, deleted or reordered entry, a "
    "truncated log, a forged entry appended, a rewritten log or head",
    "cannot detect: a rollback of log and head together to an earlier state of their own (deleting both "
    "included), or a truncation "
    "right after the last receipt the coordinator got, unless checked against the receipts in the coordinator's "
    "governance report (--receipt HEAD:COUNT); anything done by someone holding the key",
)
UNKEYED_SCOPE = (
    "UNKEYED log (no audit key): detects damage and careless edits only; anyone who can write the state "
    "folder can rewrite it so that it verifies (use --receipt HEAD:COUNT from the governance report)",
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="verify or show the node's audit log of everything it sent")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="detect edited, deleted, inserted, reordered, truncated or forged entries")
    _where(v)
    v.add_argument("--receipt", action="append", default=[], metavar="HEAD:COUNT",
                   help="a receipt from the coordinator's governance report: check it is in the log (repeatable)")
    v.set_defaults(handler=run_verify)
    s = asub.add_parser("show", help="one row per message the node sent or refused")
    _where(s)
    s.set_defaults(handler=run_show)


def _where(q: argparse.ArgumentParser) -> None:
    q.add_argument("log", type=Path, nargs="?", help="audit.jsonl (default: the one in node.yaml's state folder)")
    q.add_argument("--config", type=Path, help="node.yaml: finds the log and the node's audit key (audit.key_file)")
    q.add_argument("--key", type=Path, help="the audit key file (instead of --config)")


def _open(args: argparse.Namespace) -> AuditLog:
    from fedrad.client.governance.audit_log import AuditLog

    key: Path | None = args.key
    path: Path | None = args.log
    if args.config is not None:
        from fedrad.client.governance.audit_key import node_audit_key
        from fedrad.client.runtime.node_config import load_node_config

        node = load_node_config(args.config)
        if key is None:
            key = node_audit_key(node=node, node_yaml=args.config)
        if path is None:
            path = node.state_dir / "audit.jsonl"
    if path is None:
        raise ConfigError("<command line>", ["<command line>: give the audit log or --config node.yaml"])
    if not path.exists():
        raise AuditError(f"{path}: no such audit log")
    return AuditLog(path, key_file=key)


def _scope(report: AuditReport) -> tuple[str, ...]:
    return KEYED_SCOPE if report.keyed else UNKEYED_SCOPE


def run_verify(args: argparse.Namespace) -> int:
    from fedrad.client.governance.audit_log import parse_receipt

    receipts = [parse_receipt(r) for r in args.receipt]
    log = _open(args)
    report = log.verify_report()
    problems = list(report.problems)
    for r in receipts:
        problems.extend(log.check_receipt(r))
    mode = f"keyed (HMAC-SHA256, key {log.key_file})" if report.keyed else "unkeyed (sha256 only)"
    if problems:
        err_console.print(f"[bold red]audit log {log.path} FAILED verification[/] ({mode}):")
        for p in problems:
            err_console.print(f"  - {p}", markup=False)
        for line in _scope(report):
            err_console.print(f"  {line}", markup=False)
        return AuditError.exit_code
    console.print(f"audit log {log.path}: {report.entries} entries, chain intact, {mode}", markup=False)
    if report.unkeyed_prefix:
        console.print(f"  lines 1-{report.unkeyed_prefix} were written before the node had its audit key; the first "
                      "keyed entry pins them, so later changes to them are detected", markup=False)
    for r in receipts:
        console.print(f"  receipt {r.head[:16]}...:{r.count} is in the log", markup=False)
    for line in _scope(report):
        console.print(f"  {line}", markup=False)
    return 0


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def run_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    log = _open(args)
    t = Table(title=str(log.path))
    for col in ("#", "study", "round", "kind", "outcome", "arrays", "bytes", "epsilon before", "epsilon after", "policy"):
        t.add_column(col, justify="right")
    for e in log.entries():
        if "_malformed_line" in e:
            t.add_row(str(e["_malformed_line"]), "[red]malformed[/]", *[""] * 8)
            continue
        t.add_row(str(e.get("seq")), str(e.get("study"))[:10], str(e.get("round")), str(e.get("kind")),
                  str(e.get("outcome"))[:40], str(len(e.get("arrays") or [])), str(e.get("bytes_sent")),
                  _fmt(e.get("epsilon_before")), _fmt(e.get("epsilon_after")), str(e.get("policy_version") or "-")[:10])
    console.print(t)
    return 0
