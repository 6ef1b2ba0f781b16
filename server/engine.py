"""Flower's simulation engine: load a ClientApp by reference and run a ServerApp with N simulated
hospitals. Used by plain studies (:mod:`fedrad.server.simulation`) and secure-aggregation studies
(:mod:`fedrad.server.secagg`) alike."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedrad.common.config import StudyConfig
from fedrad.common.errors import FederationError

CLIENT_APP_REF = "fedrad.client.runtime.app:app"


def load_client_app(ref: str = CLIENT_APP_REF) -> ClientApp:
    import importlib

    module_name, _, attr = ref.partition(":")
    app = getattr(importlib.import_module(module_name), attr)
    if not isinstance(app, ClientApp):
        raise FederationError(f"{ref} is not a Flower ClientApp")
    return app


class _DropRunSimulationDeprecation(logging.Filter):
    """``run_simulation`` is Flower's in-process simulation entry point; its deprecation notice
    (pointing at ``flwr run``) is not actionable for fedrad users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_deprecation() -> None:
    lg = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in lg.filters):
        lg.addFilter(_DropRunSimulationDeprecation())


def run_engine(server_app: ServerApp, *, client_app_ref: str, study: StudyConfig) -> None:
    """Run ``server_app`` with ``federation.num_hospitals`` simulated hospitals on Flower's engine."""
    from flwr.simulation import run_simulation

    fed = study.federation
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(fed.client_cpus, cpus), "num_gpus": fed.client_gpus},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": "error"},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    _quiet_deprecation()
    run_simulation(
        server_app=server_app,
        client_app=load_client_app(client_app_ref),
        num_supernodes=fed.num_hospitals,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
