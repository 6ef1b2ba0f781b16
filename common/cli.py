"""Shared command-line plumbing: the sub-command table, logging set-up, error-to-exit-code mapping,
stopping the child processes a command started.

Each CLI (``fedrad``, ``fedrad-node``) lists its sub-commands in a table of :class:`Command`
(name, module, one-line help). Only the module of the command being run is imported: its
``register(subparsers) -> None`` adds its sub-command(s) and sets ``handler=callable(args) -> int``;
every other command is a help-only stub. So ``--help`` and every sub-command start without torch,
Opacus or Flower (those are imported inside the handlers that use them). User errors
(:class:`FedradError`) become a one-paragraph message and the error's exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.logging import RichHandler

from .errors import ConfigError, FedradError

#: Where CLIs write human-facing output (stdout); logs go to stderr.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def stop_process(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace_s`` seconds; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, the module whose ``register`` adds it, its one-line help (the
    same text the module registers; a test keeps them equal) and whether it runs Flower in this
    process (then Flower's logging is tuned before the handler runs)."""

    name: str
    module: str
    help: str
    flower: bool = False


def _chosen(argv: Sequence[str], names: set[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not a global option), if any."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in names else None
    return None


def build_parser(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str]
                 ) -> tuple[argparse.ArgumentParser, Command | None]:
    """The parser for ``argv``: the chosen command's module registers its real sub-parsers, every
    other command is a help-only stub (its module is never imported)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    from fedrad import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    by_name = {c.name: c for c in commands}
    name = _chosen(argv, set(by_name))
    chosen = by_name.get(name) if name else None
    for cmd in commands:
        if cmd.name in sub.choices:
            continue
        if chosen is not None and cmd.module == chosen.module:
            importlib.import_module(cmd.module).register(sub)
            if cmd.name not in sub.choices:
                raise RuntimeError(f"{cmd.module}.register did not add the {cmd.name!r} command")
        else:
            sub.add_parser(cmd.name, help=cmd.help)
    return parser, chosen


def setup_logging(verbosity: int, *, flower: bool = True) -> None:
    """Log level WARNING, -v INFO, -vv DEBUG. With ``flower`` (a command running Flower in this
    process) Flower's own console handler is tuned too, which imports Flower's logger."""
    level = max(logging.WARNING - 10 * verbosity, logging.DEBUG)
    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    handler.setLevel(level)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # Flower and Ray are chatty at INFO; keep them at WARNING unless -vv. Flower has its own
    # console handler: quieten it rather than printing every line twice.
    third_party = logging.DEBUG if verbosity >= 2 else logging.WARNING
    for name in ("httpx", "httpcore"):  # one line per HTTP request at INFO
        logging.getLogger(name).setLevel(third_party)
    warnings.filterwarnings("ignore", module="opacus")  # known, harmless: secure RNG off, hook notices
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.modules.module")
    if not flower and "flwr" not in sys.modules:
        return
    importlib.import_module("flwr.supercore.logger")  # creates Flower's own handler now, so we can tune it
    for name in ("flwr", "ray"):
        lg = logging.getLogger(name)
        lg.propagate = False
        for h in lg.handlers:
            h.setLevel(third_party)
        if not lg.handlers:
            lg.addHandler(handler)
            lg.setLevel(third_party)


def run_cli(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = build_parser(prog, description, commands, argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, flower=chosen is None or chosen.flower)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        # soft_wrap: messages name files and values; never break them at the terminal width
        err_console.print(f"[bold red]configuration error[/] in {exc.source}:", soft_wrap=True)
        for p in exc.problems:
            err_console.print(f"  - {p}", markup=False, soft_wrap=True)
        return exc.exit_code
    except FedradError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
