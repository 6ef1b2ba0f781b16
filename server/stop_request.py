"""``fedrad stop`` and a running ServerApp agree on who writes a run's ``metrics.json`` last.

Flower ends a stopped run on the SuperLink at once, but the ServerApp process may still be waiting
for replies and save its history again afterwards. So ``fedrad stop`` first leaves a stop request
(``stop-requested``, holding the Flower run id) in the run folder; from then on the ServerApp of
that run saves nothing and ends (:class:`RunStopRequested`), and ``fedrad stop`` marks the run
interrupted once Flower reports it finished. Both sides check and write under one file lock, so a
save cannot slip in between the check and the mark. A request names its run id: a later run
resumed in the same folder (a new Flower run id) is not affected by an old request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from fedrad.common.durable import atomic_write_text
from fedrad.common.errors import FederationError

try:  # POSIX: coordinators run on Linux; elsewhere the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STOP_FILE = "stop-requested"
LOCK_FILE = ".metrics.lock"

_guarded: dict[Path, str] = {}
_guard_lock = threading.Lock()


class RunStopRequested(FederationError):
    """The operator asked to stop this run (``fedrad stop``): the ServerApp saves nothing more."""


def request_stop(run_dir: Path, *, run_id: str) -> None:
    """Leave the stop request for Flower run ``run_id`` in ``run_dir`` (before Flower is told)."""
    if not str(run_id).strip():
        raise FederationError(f"{run_dir}: a stop request needs the Flower run id")
    run_dir.mkdir(parents=True, exist_ok=True)
    with metrics_lock(run_dir):
        atomic_write_text(run_dir / STOP_FILE, f"{str(run_id).strip()}\n")


def stop_requested(run_dir: Path, *, run_id: str) -> bool:
    """Whether ``fedrad stop`` asked to stop Flower run ``run_id`` writing into ``run_dir``."""
    try:
        return (run_dir / STOP_FILE).read_text(encoding="utf-8").strip() == str(run_id).strip()
    except OSError:
        return False


@contextlib.contextmanager
def metrics_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on ``run_dir``'s metrics (a lock file beside ``metrics.json``)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def guard_run(run_dir: Path, *, run_id: str) -> Iterator[None]:
    """While active, saves of ``run_dir``'s history honour stop requests for ``run_id`` (the ServerApp)."""
    key = run_dir.resolve()
    with _guard_lock:
        _guarded[key] = str(run_id)
    try:
        yield
    finally:
        with _guard_lock:
            _guarded.pop(key, None)


def guarded_run(run_dir: Path) -> str | None:
    """The Flower run id whose ServerApp writes ``run_dir`` in this process, if any."""
    with _guard_lock:
        return _guarded.get(run_dir.resolve())


def check_not_stopped(run_dir: Path, *, run_id: str) -> None:
    """Raise :class:`RunStopRequested` when ``fedrad stop`` asked to stop ``run_id`` (call under the lock)."""
    if stop_requested(run_dir, run_id=run_id):
        log.info("run %s: stop requested; %s is left to `fedrad stop`", run_id, run_dir.name)
        raise RunStopRequested(f"run {run_id} was stopped with `fedrad stop`; {run_dir} is marked by it")
