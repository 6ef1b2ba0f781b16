"""Flower's commands are those of the environment fedrad runs in, also when its virtual environment
is not activated (its bin folder not on PATH): the coordinator's environment for ``flwr`` and
``flower-superlink`` puts the interpreter's folder first."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fedrad.server.coordinator import with_own_scripts

BIN = str(Path(sys.executable).parent)


def test_the_interpreters_scripts_come_first_once() -> None:
    # arrange: a PATH without this environment (as under pyenv's shims or a bare service)
    env = {"PATH": "/usr/bin:/bin", "X": "1"}
    # act
    once = with_own_scripts(env)
    twice = with_own_scripts(once)
    # assert
    assert once["PATH"].split(os.pathsep) == [BIN, "/usr/bin", "/bin"] and once["X"] == "1"
    assert twice == once
    assert shutil.which("flwr", path=once["PATH"]) == str(Path(BIN) / "flwr")


def test_an_empty_path_gets_only_the_scripts_folder() -> None:
    assert with_own_scripts({})["PATH"] == BIN
