"""Every Python package folder of the project ships in the wheel (pyproject's explicit package list)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = {"common": "fedrad.common", "client": "fedrad.client", "server": "fedrad.server"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in TOPS.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))

    missing = sorted(found - listed)

    assert not missing, f"package folders missing from [tool.setuptools] packages: {missing}"
