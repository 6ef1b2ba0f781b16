"""Shared command-line plumbing: sub-command discovery, logging set-up, error-to-exit-code mapping,
stopping the child processes a command started.

Each package (``fedrad.server``, ``fedrad.client``) holds modules named ``cmd_<name>.py`` with a
``register(subparsers) -> None`` function that adds its sub-command(s) and sets
``handler=callable(args) -> int`` on the parser. User errors (:class:`FedradError`) become a
one-paragraph message and the error's exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

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


def discover_commands(package: ModuleType) -> list[ModuleType]:
    mods = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            mods.append(importlib.import_module(f"{package.__name__}.{info.name}"))
    return mods


def setup_logging(verbosity: int) -> None:
    level = max(logging.WARNING - 10 * verbosity, logging.DEBUG)
    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    handler.setLevel(level)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # Flower and Ray are chatty at INFO; keep them at WARNING unless -vv. Flower has its own
    # console handler: quieten it rather than printing every line twice.
    third_party = logging.DEBUG if verbosity >= 2 else logging.WARNING
    importlib.import_module("flwr.supercore.logger")  # creates Flower's own handler now, so we can tune it
    for name in ("flwr", "ray"):
        lg = logging.getLogger(name)
        lg.propagate = False
        for h in lg.handlers:
            h.setLevel(third_party)
        if not lg.handlers:
            lg.addHandler(handler)
            lg.setLevel(third_party)
    warnings.filterwarnings("ignore", module="opacus")  # known, harmless: secure RNG off, hook notices
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.modules.module")


def run_cli(prog: str, description: str, package: ModuleType, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    from fedrad import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in discover_commands(package):
        mod.register(sub)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
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
