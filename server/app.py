"""The coordinator's Flower ServerApp for deployment (SuperLink + real hospital SuperNodes).

The SuperLink starts this app (``fedrad.server.app:app``) for each run ``fedrad run`` submits (a
code-free Flower app naming this ServerApp and ``fedrad.client.runtime.secagg_app:app``, which answers
plain studies with the plain app; see :func:`fedrad.server.coordinator.write_app`). The run
configuration names the study YAML *on the coordinator* and the run folder; the study body is the
same the simulation uses: :func:`fedrad.server.study.run_study`, or
:func:`fedrad.server.secagg.run_secagg_study` for a study with ``secure_aggregation.enabled``
(SecAgg+ over the SuperLink: the hospitals' updates arrive masked). Hospitals find their own data,
ledger and budget through their node.yaml; nothing here can move them.

Run-config keys:

* ``study-config``: path of the study YAML on the coordinator (required)
* ``run-dir``: run folder; default ``<output.dir>/<name>-<timestamp>``; an existing, unfinished
  run folder of the same study resumes from its last checkpoint
* ``poll-interval``: seconds between checks for hospital replies (default 0.25; Flower's own
  deployment Grid waits 3 s); 0 keeps Flower's Grid unchanged
* ``registry``: the coordinator's node registry (``nodes.json``, hospital name -> node id): hospitals
  are named by the key they authenticated with in every record

``fedrad run`` (see :mod:`fedrad.server.cmd_run`) fills all three from a TOML file it writes into
the run folder (``run-config.toml``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrad.common.config import load_study
from fedrad.common.durable import atomic_write_text
from fedrad.common.errors import ConfigError, FederationError, FedradError

from .deploy_grid import FastPollGrid
from .history import RoundRecord, StudyHistory
from .names import RegistryNames
from .resume import accept_run
from .run_records import mark_interrupted_locked
from .secagg import run_secagg_study
from .stop_request import RunStopRequested, guard_run, metrics_lock, stop_requested
from .study import check_study_data, run_study

log = logging.getLogger(__name__)

STUDY_KEY = "study-config"
RUN_DIR_KEY = "run-dir"
POLL_KEY = "poll-interval"
REGISTRY_KEY = "registry"
#: How long a ServerApp that met a stop request waits for Flower to end it (2.5 x its task heartbeat).
STOP_WAIT_S = 75.0

app = ServerApp()


class LogReporter:
    """Progress to the SuperLink's log (there is no terminal in deployment)."""

    def study_started(self, *, name: str, first_round: int, total_rounds: int, hospitals: int) -> None:
        log.info("study %s: rounds %d..%d with %d hospitals", name, first_round, total_rounds, hospitals)

    def round_started(self, round: int) -> None:
        log.info("round %d started", round)

    def round_finished(self, record: RoundRecord, history: StudyHistory) -> None:
        log.info("round %d finished in %.1fs: %d hospitals answered, aggregated=%s",
                 record.round, record.seconds, len(record.hospitals), record.aggregated)

    def round_validated(self, record: RoundRecord, history: StudyHistory) -> None:
        log.info("round %d validated: pooled AUC %s, test AUC %s", record.round, record.pooled.get("auc"),
                 record.global_test.get("auc"))

    def study_finished(self, history: StudyHistory) -> None:
        log.info("study finished: %s", history.status)

    def note(self, text: str) -> None:
        log.warning("%s", text)


def resolve_run(run_config: dict[str, object]) -> tuple[Path, Path]:
    """(study YAML, run folder) from a run configuration; errors name the key."""
    study_path = run_config.get(STUDY_KEY)
    if not study_path:
        raise ConfigError("<run-config>", [f"<run-config>: {STUDY_KEY}: required (got {study_path!r})"])
    study_file = Path(str(study_path)).expanduser().resolve()
    run_dir = run_config.get(RUN_DIR_KEY)
    if run_dir:
        return study_file, Path(str(run_dir)).expanduser().resolve()
    study = load_study(study_file)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return study_file, (Path(study.output.dir) / f"{study.federation.name}-{stamp}").resolve()


class RunStopped(SystemExit):
    """SIGTERM reached the ServerApp (``fedrad stop``, or the coordinator shutting down)."""


def _raise_stop(signum: int, frame: object) -> None:
    raise RunStopped(128 + signum)


def mark_ended(metrics_file: Path, exc: BaseException, *, run_id: str) -> None:
    """Make a run's metrics.json tell the truth when the study did not end by itself. After
    ``fedrad stop`` (its stop request names ``run_id``) the run is marked ``interrupted``, as
    ``fedrad stop`` itself does, whichever of the two gets there first. Otherwise a status still
    "running" becomes "stopped: ..." (the operator or Flower ended the run) or "failed: ..." (a crash).
    Never raises: the exception that ended the run is the one to report."""
    run_dir = metrics_file.parent
    if not metrics_file.is_file():
        return
    try:
        with metrics_lock(run_dir):  # decided and written under the lock `fedrad stop` takes too
            if stop_requested(run_dir, run_id=run_id):
                mark_interrupted_locked(run_dir, reason="stopped with `fedrad stop`")
            else:
                _mark_ended(metrics_file, exc)
    except (FedradError, OSError, ValueError) as err:
        log.warning("could not record the run's end in %s (%s)", metrics_file, err)


def await_flower_stop(*, timeout_s: float) -> None:
    """After a stop request, wait (bounded) for Flower to end this ServerApp: its task heartbeat
    (about every 24 s) learns that the run was stopped and interrupts the process, and Flower then
    records the run as stopped. Returns if that did not happen within ``timeout_s``."""
    log.info("stop requested with `fedrad stop`: waiting up to %.0f s for Flower to end the run", timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)


def _mark_ended(metrics_file: Path, exc: BaseException) -> None:
    try:
        data = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(data, dict) or data.get("status") not in (None, "running"):
        return
    name = type(exc).__name__
    stopped = isinstance(exc, (RunStopped, KeyboardInterrupt)) or "NotRunning" in name or "Stopped" in name
    data["status"] = ("stopped: the run was stopped (fedrad stop or coordinator shutdown)" if stopped
                      else f"failed: {name}")
    try:
        atomic_write_text(metrics_file, json.dumps(data, indent=2, allow_nan=False) + "\n")
    except (OSError, ValueError) as err:
        log.warning("could not record the run's end in %s (%s)", metrics_file, err)


@app.main()
def main(grid: Grid, context: Context) -> None:
    study_file, run_dir = resolve_run(dict(context.run_config))
    study = load_study(study_file)
    check_study_data(study)  # class names against the data, before anything is written
    accept_run(study, run_dir, rewrite_config=True)  # refuses another study's run folder before writing anything
    registry = str(context.run_config.get(REGISTRY_KEY, "") or "")
    names = RegistryNames(Path(registry)) if registry else None
    log.info("study %s from %s; outputs in %s", study.federation.name, study_file, run_dir)
    poll = float(context.run_config.get(POLL_KEY, 0.25) or 0.0)  # type: ignore[arg-type]
    if poll > 0:
        grid = FastPollGrid(grid, interval=poll)
    previous = signal.signal(signal.SIGTERM, _raise_stop) if threading.current_thread() is threading.main_thread() else None
    run_id = str(context.run_id)
    try:
        with guard_run(run_dir, run_id=run_id):  # once `fedrad stop` asks, this run saves nothing more
            if study.secure_aggregation.enabled:
                history = run_secagg_study(grid, study=study, run_dir=run_dir, context=context,
                                           reporter=LogReporter())
            else:
                history = run_study(grid, study=study, run_dir=run_dir, reporter=LogReporter(), names=names)
    except BaseException as exc:  # fedrad stop (Flower ends the run), SIGTERM, or a crash: records say so
        mark_ended(run_dir / "metrics.json", exc, run_id=run_id)
        if isinstance(exc, RunStopRequested):  # ended before Flower's stop reached it: let Flower end it
            await_flower_stop(timeout_s=STOP_WAIT_S)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for event in history.events:
        log.info("note: %s", event)
    if history.status != "completed":
        raise FederationError(f"study {study.federation.name} ended {history.status} (outputs in {run_dir})")
