"""deploy/fedrad-node.sh: the optional jemalloc preload (FEDRAD_JEMALLOC=1) is opt-in and fails hard."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "fedrad-node.sh"
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "missing-node.yaml")], capture_output=True, text=True,
                          check=False, env={**base, **env}, timeout=30)


def test_asking_for_a_missing_jemalloc_refuses_to_start(tmp_path: Path) -> None:
    proc = _run(tmp_path, FEDRAD_JEMALLOC="1", FEDRAD_JEMALLOC_LIB=str(tmp_path / "nope.so"))
    assert proc.returncode != 0 and "libjemalloc.so.2 not found" in proc.stderr


def test_a_bad_switch_value_is_refused(tmp_path: Path) -> None:
    proc = _run(tmp_path, FEDRAD_JEMALLOC="yes")
    assert proc.returncode != 0 and "FEDRAD_JEMALLOC must be 0 or 1" in proc.stderr


def test_off_by_default(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert "jemalloc" not in proc.stderr and "not found" in proc.stderr  # went on to the config check


@pytest.mark.skipif(not JEMALLOC.exists(), reason="libjemalloc2 not installed")
def test_found_jemalloc_is_preloaded(tmp_path: Path) -> None:
    proc = _run(tmp_path, FEDRAD_JEMALLOC="1")
    assert f"using jemalloc ({JEMALLOC})" in proc.stderr
    assert "node configuration" in proc.stderr  # then the usual checks run
