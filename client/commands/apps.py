"""``fedrad-node apps list|approve|revoke|check``: which apps (FABs) may run on this node's data."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import TYPE_CHECKING

from fedrad.common.cli import console, err_console
from fedrad.common.errors import ConfigError

if TYPE_CHECKING:  # imported when a command runs, so that `--help` stays instant
    from fedrad.client.governance.approval import AppAllowList, AppApprovalSettings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("apps", help="approve, revoke and list the apps (Flower bundles) allowed to run on this node")
    asub = p.add_subparsers(dest="apps_command", metavar="ACTION", required=True)

    def where(q: argparse.ArgumentParser) -> None:
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--config", type=Path, help="node.yaml (the allow-list lives in its state folder)")
        g.add_argument("--allow-list", type=Path, help="an allow-list file (approved-apps.json)")

    ls = asub.add_parser("list", help="approvals in force (--all: revoked ones too)")
    where(ls)
    ls.add_argument("--all", action="store_true", help="include revoked approvals")
    ls.set_defaults(handler=run_list)

    ap = asub.add_parser("approve", help="approve a reviewed app bundle (.fab) or its sha256")
    where(ap)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("bundle", type=Path, nargs="?", help="the .fab file you reviewed")
    what.add_argument("--hash", help="the bundle's sha256 (64 hex digits), when you do not hold the file")
    ap.add_argument("--by", default=None, help="who approves (default: the current user)")
    ap.add_argument("--note", default="", help="why / reference to the review (no patient data)")
    ap.set_defaults(handler=run_approve)

    rv = asub.add_parser("revoke", help="revoke an approval (kept in the file, marked revoked) and remove the app's "
                                         "installed folder from Flower's home ($FLWR_HOME or ~/.flwr)")
    where(rv)
    rv.add_argument("hash", help="the approved bundle's sha256 or a unique prefix of at least 8 digits")
    rv.add_argument("--by", default=None, help="who revokes (default: the current user)")
    rv.add_argument("--reason", default="", help="why")
    rv.set_defaults(handler=run_revoke)

    ck = asub.add_parser("check", help="would this bundle be allowed to run here? (exit 0 yes, 8 no)")
    where(ck)
    ck.add_argument("bundle", type=Path, help="a .fab file")
    ck.set_defaults(handler=run_check)


def _allow_list(args: argparse.Namespace) -> tuple[AppAllowList, AppApprovalSettings | None]:
    from fedrad.client.governance.approval import AppAllowList

    if args.allow_list is not None:
        return AppAllowList(args.allow_list), None
    from fedrad.client.runtime.node_config import load_node_config

    node = load_node_config(args.config)
    return AppAllowList.for_state_dir(node.state_dir), node.apps


def _read_bundle(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read bundle: {exc.strerror}"]) from None


def run_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    allow, _ = _allow_list(args)
    rows = allow.records() if args.all else allow.approved()
    t = Table(title=f"apps approved on this node ({allow.path})")
    for col in ("sha256", "app", "version", "approved by", "approved at", "note", "revoked"):
        t.add_column(col)
    for r in rows:
        app = "/".join(x for x in (r.get("publisher"), r.get("name")) if x) or "-"
        revoked = f"{r['revoked_at']} by {r['revoked_by']}" if r.get("revoked_at") else ""
        t.add_row(str(r["fab_hash"])[:16], app, str(r.get("version") or "-"), str(r["approved_by"]),
                  str(r["approved_at"]), str(r.get("note") or ""), revoked)
    console.print(t)
    if not rows:
        console.print("no approvals: no app can run on this node's data")
    return 0


def run_approve(args: argparse.Namespace) -> int:
    from fedrad.client.governance.approval import check_hash, fab_hash, inspect_fab

    allow, _ = _allow_list(args)
    info = None
    if args.bundle is not None:
        content = _read_bundle(args.bundle)
        info = inspect_fab(content)
        digest = fab_hash(content)
    else:
        digest = check_hash(args.hash)
    rec = allow.approve(digest=digest, by=args.by or getpass.getuser(), note=args.note, info=info)
    label = f" ({info.label}, ClientApp {info.clientapp or '?'}, {len(info.code_files)} code files)" if info else ""
    console.print(f"approved {rec['fab_hash']}{label} by {rec['approved_by']} at {rec['approved_at']}", markup=False)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from fedrad.client.governance.app_folder import APP_DIR, HASH_PREFIX, flower_home, remove_app_folders

    allow, _ = _allow_list(args)
    digest = allow.resolve(args.hash)
    rec = allow.revoke(digest=digest, by=args.by or getpass.getuser(), reason=args.reason)
    console.print(f"revoked {rec['fab_hash']} by {rec['revoked_by']} at {rec['revoked_at']}", markup=False)
    home = flower_home()
    removed = remove_app_folders(flwr_home=home, revoked=[digest], approved=[r["fab_hash"] for r in allow.approved()])
    for folder in removed:
        console.print(f"removed its installed folder {folder}", markup=False)
    left = [p for p in (home / APP_DIR).glob(f"*.{digest[:HASH_PREFIX]}")] if (home / APP_DIR).is_dir() else []
    if left:  # kept: another approved app shares the 8-digit prefix Flower names folders by
        console.print(f"kept {', '.join(map(str, left))} (an approved app's folder has the same name prefix)",
                      markup=False)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from fedrad.client.governance.approval import AppNotApproved, verify_app

    allow, settings = _allow_list(args)
    content = _read_bundle(args.bundle)
    try:
        digest = verify_app(fab_content=content, claimed_hash=None, allow_list=allow, settings=settings)
    except AppNotApproved as exc:
        err_console.print("[bold red]refused:[/]", end=" ")
        err_console.print(str(exc), markup=False)
        return exc.exit_code
    console.print(f"{args.bundle}: sha256 {digest} may run on this node", markup=False)
    return 0
