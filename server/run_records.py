"""Mark a run folder whose ServerApp ended without writing its own last word (a run stopped through
Flower, a killed process): ``metrics.json`` then says ``interrupted`` with the reason, and rounds
after the last checkpoint are dropped so that a resume re-runs them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedrad.common.errors import FederationError

from .history import StudyHistory
from .stop_request import metrics_lock

log = logging.getLogger(__name__)


def interrupted_history(run_dir: Path, *, reason: str, lock_held: bool = False) -> StudyHistory:
    """The run's history as saved so far (empty when there is no metrics.json), marked interrupted
    (``lock_held``: the caller holds the run's metrics lock, see :meth:`StudyHistory.save`)."""
    from .study import save_interrupted

    path = run_dir / "metrics.json"
    data = _read(path) if path.is_file() else {}
    history = StudyHistory.resume(path, study=data.get("study", {}), study_id=data.get("study_id", ""),
                                  up_to_round=10**9)
    return save_interrupted(history, run_dir=run_dir, reason=reason, lock_held=lock_held)


def mark_interrupted(run_dir: Path, *, reason: str) -> StudyHistory | None:
    """Mark ``run_dir`` interrupted when its ``metrics.json`` still says ``running``; a run that
    finished, failed or was already marked is left as it is. None when there is no metrics.json yet."""
    if not (run_dir / "metrics.json").is_file():
        return None
    with metrics_lock(run_dir):  # a ServerApp's save cannot land between this check and the mark
        return mark_interrupted_locked(run_dir, reason=reason)


def mark_interrupted_locked(run_dir: Path, *, reason: str) -> StudyHistory | None:
    """:func:`mark_interrupted` for a caller that holds ``run_dir``'s metrics lock already."""
    path = run_dir / "metrics.json"
    if not path.is_file() or _read(path).get("status") != "running":
        return None
    log.info("marking %s interrupted: %s", run_dir.name, reason)
    return interrupted_history(run_dir, reason=reason, lock_held=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FederationError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}
