"""Run a study as a simulated federation on this machine (Flower's simulation engine).

The ServerApp runs :func:`fedrad.server.study.run_study`; each simulated hospital runs the very
ClientApp that deployment uses, loaded by Flower from its reference string, so the coordinator
never imports hospital code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrad.common.config import StudyConfig
from fedrad.common.errors import FederationError

from .engine import CLIENT_APP_REF, run_engine
from .history import StudyHistory
from .interrupt import InterruptibleGrid, StopRequest, StudyInterrupted, stop_on_signals
from .progress import Reporter
from .run_records import interrupted_history
from .secagg import SECAGG_CLIENT_APP_REF, run_secagg_study
from .study import run_study

log = logging.getLogger(__name__)


def simulate(study: StudyConfig, *, run_dir: Path, reporter: Reporter | None = None,
             stop: StopRequest | None = None) -> StudyHistory:
    """Run ``study`` with ``federation.num_hospitals`` simulated hospitals; outputs go to ``run_dir``.

    SIGINT/SIGTERM (or ``stop.request``) end the study at the next safe point: the state is saved
    (``metrics.json`` status ``interrupted``, the checkpoints so far) and the history is returned."""
    run_dir = run_dir.resolve()
    state_dir = run_dir / "sites"
    outcome: dict[str, StudyHistory] = {}
    server_app = ServerApp()
    secure = study.secure_aggregation.enabled
    stop = stop or StopRequest()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        extra = {"sim-state-dir": str(state_dir)}
        safe_grid = InterruptibleGrid(grid, stop)
        try:
            if secure:
                outcome["history"] = run_secagg_study(safe_grid, study=study, run_dir=run_dir, context=context,
                                                      reporter=reporter, extra_config=extra)
            else:
                outcome["history"] = run_study(safe_grid, study=study, run_dir=run_dir, reporter=reporter,
                                               extra_config=extra)
        except StudyInterrupted as exc:  # a runner that does not record interruptions itself
            outcome["history"] = interrupted_history(run_dir, reason=str(exc))

    # run_engine keeps these handlers in force over Ray's start (Ray's own SIGTERM handler exits at
    # once, leaving the ServerApp thread waiting and the state unsaved)
    with stop_on_signals(stop):
        run_engine(server_app, client_app_ref=SECAGG_CLIENT_APP_REF if secure else CLIENT_APP_REF, study=study)
    if "history" not in outcome:
        if stop.is_set():
            return interrupted_history(run_dir, reason=stop.reason or "stop requested")
        raise FederationError("the simulated federation ended without a result (see the log above)")
    return outcome["history"]
