"""Shorter waits for objects of a message that are still being uploaded (issue 14).

Flower 1.41 lists a message to its receiver as soon as its sender registered it, before the sender
has pushed its objects (44.7 MB for ResNet-18), so the receiver's first pulls usually find objects
still on their way; Flower then waits 1 s doubling up to 10 s per object
(``flwr.supercore.constant.PULL_*``). The SuperNode (client/runtime/node.py) and the ServerApp's
Grid (server/deploy_grid.py) both retry after :data:`QUICK_PULL_BACKOFF_S` instead; Flower's total
patience (``PULL_MAX_TIME``) is kept. ``FEDRAD_QUICK_PULLS=0`` in a process's environment keeps
Flower's own waits (for side-by-side measurements).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Mapping

#: ``0`` keeps Flower's own object-pull waits; anything else, or unset, uses the quick ones.
QUICK_PULLS_ENV = "FEDRAD_QUICK_PULLS"
#: First wait and cap (seconds) between tries of a pull that found the object not uploaded yet.
QUICK_PULL_BACKOFF_S = (0.05, 0.5)


def quick_pulls_enabled(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(QUICK_PULLS_ENV, "1").strip() != "0"


def quicken_pulls(module: types.ModuleType) -> None:
    """Make ``module.pull_objects`` (Flower's object puller as ``module`` imported it) retry after
    :data:`QUICK_PULL_BACKOFF_S`, with no per-object try limit (the total time limit stays Flower's)."""
    if getattr(module, "_fedrad_quick_pulls", False):
        return
    initial, cap = QUICK_PULL_BACKOFF_S
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        module.pull_objects, initial_backoff=initial, backoff_cap=cap, max_tries_per_object=None)
    module._fedrad_quick_pulls = True  # type: ignore[attr-defined]
