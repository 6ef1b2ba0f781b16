"""``fedrad report RUN_DIR``: (re)build a run folder's ``report.html`` and ``report.md``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedrad.common.cli import console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report", help="build a run folder's study report (report.html, report.md)",
        description="Build report.html (self-contained: images embedded, no network needed) and report.md "
        "from a run folder's metrics.json, config.yaml, governance.json and model.pt.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holds metrics.json)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .report_html import build_report

    html_path, md_path = build_report(args.run_dir)
    console.print(f"wrote {html_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m fedrad.server.cmd_report RUN_DIR``)."""
    from fedrad.common.cli import err_console, setup_logging
    from fedrad.common.errors import FedradError

    parser = argparse.ArgumentParser(prog="fedrad")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    setup_logging(0)
    try:
        return int(args.handler(args) or 0)
    except FedradError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
