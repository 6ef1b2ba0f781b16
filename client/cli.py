"""``fedrad-node``: the hospital node's command line (sub-commands live in ``cmd_*.py`` modules)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedrad.common.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    import fedrad.client as package

    return run_cli("fedrad-node", "fedrad hospital node: site data, privacy ledger, joining a federation.", package, argv)


if __name__ == "__main__":
    sys.exit(main())
