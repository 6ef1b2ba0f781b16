"""Issue 14: ``fedrad --help``, ``fedrad-node --help`` and every sub-command's ``--help`` start at once:
no torch, Opacus, Flower (or numpy, pydicom, matplotlib) is imported, checked in a fresh subprocess,
and the CPU time of the whole process stays under a generous bound."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrad.client.cli import COMMANDS as NODE_COMMANDS
from fedrad.common.cli import Command, build_parser
from fedrad.server.cli import COMMANDS as COORDINATOR_COMMANDS

PROBE = Path(__file__).with_name("help_probe.py")
CLIS = {"fedrad.server.cli": COORDINATOR_COMMANDS, "fedrad.client.cli": NODE_COMMANDS}
#: Idle: about 0.1 s per command (see the report); generous for a loaded 2-core machine.
CPU_BOUND_S = 3.0
#: Modules owned by another helper that still import torch/Opacus at module level (their imports must
#: move inside their handlers); the CLI itself imports them only when their command is named.
NOT_YET_LAZY: set[str] = set()


def probe(module: str, argv: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(PROBE), module, *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("PROBE ")]
    assert done.returncode == 0 and line, done.stderr[-2000:]
    return dict(json.loads(line[-1][len("PROBE "):]))


def _registered(commands: tuple[Command, ...]) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    sub = argparse.ArgumentParser().add_subparsers()
    for module in dict.fromkeys(c.module for c in commands):
        importlib.import_module(module).register(sub)
    return sub


def _paths(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    """Every command path under ``parser`` (itself included)."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _paths(child, [*prefix, name])
    return found


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_the_command_table_is_what_the_modules_register(cli: str) -> None:
    # arrange
    commands = CLIS[cli]
    # act
    sub = _registered(commands)
    # assert: same names, same one-line help (the table is what --help shows without importing)
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert {c.name: c.help for c in commands} == helps


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_top_level_help_lists_every_command_without_heavy_imports(cli: str) -> None:
    report = probe(cli, ["--help"])
    assert report["rc"] == 0
    assert report["heavy"] == [], report["heavy"]
    assert float(report["cpu_s"]) < CPU_BOUND_S  # type: ignore[arg-type]
    for c in CLIS[cli]:
        assert c.name in str(report["stdout"])


@pytest.mark.parametrize(("cli", "name"), [
    pytest.param(cli, c.name, id=f"{cli.split('.')[1]}-{c.name}",
                 marks=[pytest.mark.xfail(reason=f"{c.module} imports torch/Opacus at module level (not this "
                                          "helper's file)", strict=False)] if c.module in NOT_YET_LAZY else [])
    for cli, commands in sorted(CLIS.items()) for c in commands])
def test_every_subcommand_help_starts_without_heavy_imports(cli: str, name: str) -> None:
    # arrange: every action under the command (e.g. `apps approve`), from the real parser
    parser, _ = build_parser("p", "d", CLIS[cli], [name])
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    paths = _paths(top.choices[name], [name])
    # act
    reports = {" ".join(p): probe(cli, [*p, "--help"]) for p in paths}
    # assert
    for path, report in reports.items():
        assert report["rc"] == 0, path
        assert report["heavy"] == [], (path, report["heavy"])
        assert float(report["cpu_s"]) < CPU_BOUND_S, (path, report["cpu_s"])  # type: ignore[arg-type]
        assert "usage:" in str(report["stdout"]), path


def test_only_the_named_commands_module_is_imported() -> None:
    # act
    parser, chosen = build_parser("fedrad-node", "d", NODE_COMMANDS, ["-v", "keygen", "--out", "x"])
    # assert: keygen is real, the others are help-only stubs
    assert chosen is not None and chosen.name == "keygen"
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert top.choices["ledger"].get_default("handler") is None
    args = parser.parse_args(["-v", "keygen", "--out", "x"])
    assert args.verbose == 1 and callable(args.handler)
