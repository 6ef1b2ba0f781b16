"""``fedrad``: the coordinator's command line (sub-commands live in ``cmd_*.py`` modules)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedrad.common.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    import fedrad.server as package

    return run_cli("fedrad", "fedrad coordinator: provision, simulate and run federated DP studies.", package, argv)


if __name__ == "__main__":
    sys.exit(main())
