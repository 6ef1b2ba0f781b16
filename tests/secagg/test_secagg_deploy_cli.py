"""`fedrad run` and the deployment ServerApp with a secure-aggregation study (fast; no federation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import Context, RecordDict

from fedrad.common.errors import ConfigError, FederationError
from fedrad.server import app as server_app
from fedrad.server.cli import main as fedrad_main
from fedrad.server.history import StudyHistory
from tests.conftest import small_study_dict
from tests.deploy.test_coordinator import prov  # noqa: F401 - the provisioned-coordinator fixture


def _study(path: Path, **overrides: Any) -> Path:
    d = small_study_dict(secure_aggregation={"enabled": True, **overrides.pop("secure_aggregation", {})}, **overrides)
    d["data"].pop("max_train_per_hospital", None)  # a deployed study has no data caps (hospitals refuse them)
    d["data"].pop("max_val_per_hospital", None)
    path.write_text(yaml.safe_dump(d))
    return path


def test_run_refuses_an_unsafe_secagg_study_before_submitting(prov: Path, tmp_path: Path,  # noqa: F811
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path / "study.yaml", federation={"num_hospitals": 5},
                   secure_aggregation={"reconstruction_threshold": 3}, strategy={"name": "krum"})
    assert fedrad_main(["run", "--prov", str(prov), "--config", str(study)]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert str(study) in err and "secure_aggregation.reconstruction_threshold" in err and "krum" in err
    assert "coordinator start" not in err  # refused before looking for a coordinator


def test_run_submits_a_safe_secagg_study(prov: Path, tmp_path: Path,  # noqa: F811
                                         capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path / "study.yaml", federation={"num_hospitals": 4, "min_hospitals": 3})
    # no coordinator is running: the study got past every secure-aggregation check to the submission
    assert fedrad_main(["run", "--prov", str(prov), "--config", str(study)]) == FederationError.exit_code
    err = capsys.readouterr().err
    assert "coordinator start" in err and "simulation only" not in err


def test_server_app_runs_secagg_studies_with_the_secagg_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def runner(name: str):  # type: ignore[no-untyped-def]
        def run(grid, *, study, run_dir, reporter, **kw):  # type: ignore[no-untyped-def]
            calls.append(name)
            assert ("context" in kw) == (name == "secagg")  # the legacy workflow needs the ServerApp context
            h = StudyHistory(run_dir / "metrics.json", study=study.to_dict(), study_id="x")
            h.status = "completed"
            return h
        return run

    monkeypatch.setattr(server_app, "run_secagg_study", runner("secagg"))
    monkeypatch.setattr(server_app, "run_study", runner("plain"))
    ctx = lambda study: Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),  # noqa: E731
                                run_config={"study-config": str(study), "run-dir": str(tmp_path / "r"),
                                            "poll-interval": 0.0})
    server_app.main(None, ctx(_study(tmp_path / "s.yaml")))  # type: ignore[arg-type]
    plain = tmp_path / "p.yaml"
    plain.write_text(yaml.safe_dump(small_study_dict()))
    server_app.main(None, ctx(plain))  # type: ignore[arg-type]
    assert calls == ["secagg", "plain"]
