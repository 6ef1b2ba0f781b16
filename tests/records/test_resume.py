"""Resume that always works: a run folder's study without its operational fields (issue 11, part 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrad.common.config import parse_study
from fedrad.common.errors import FederationError
from fedrad.server.checkpoints import save_checkpoint
from fedrad.server.cli import main
from fedrad.server.cmd_simulate import choose_study
from fedrad.server.resume import OPERATIONAL_FIELDS, check_resumable, study_identity
from tests.conftest import small_study_dict, write_yaml


def _run_with_checkpoint(run_dir: Path, study_dict: dict, *, study_id: str | None = "abcd1234abcd1234") -> None:
    study = parse_study(study_dict)
    save_checkpoint(run_dir / "checkpoints" / "round-0002.pt", state_dict={"w": torch.zeros(2)}, study=study.to_dict(),
                    round=2, class_names=["a", "b"], extra={"study_id": study_id} if study_id else None)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_operational_fields_do_not_change_the_study(tmp_path: Path) -> None:
    base = small_study_dict()
    _run_with_checkpoint(tmp_path, base)
    moved = small_study_dict(output={"dir": "/elsewhere", "checkpoint_every": 5},
                             federation={"round_timeout_s": 60.0, "client_cpus": 2.0})

    sid = check_resumable(parse_study(moved), tmp_path)

    assert sid == "abcd1234abcd1234"  # the recorded study id is kept: hospitals see the same study
    ident = study_identity(parse_study(moved).to_dict())
    for dotted in OPERATIONAL_FIELDS:
        section, _, key = dotted.partition(".")
        assert key not in ident[section]


def test_a_checkpoint_without_a_recorded_id_keeps_its_fingerprint(tmp_path: Path) -> None:
    _run_with_checkpoint(tmp_path, small_study_dict(), study_id=None)

    sid = check_resumable(parse_study(small_study_dict(output={"dir": "/x"})), tmp_path)

    assert sid == parse_study(small_study_dict()).fingerprint()[:16]


def test_another_study_is_refused_naming_the_fields(tmp_path: Path) -> None:
    _run_with_checkpoint(tmp_path, small_study_dict())
    other = parse_study(small_study_dict(privacy={"epsilon": 3.0}, training={"lr": 0.5}))

    with pytest.raises(FederationError) as ei:
        check_resumable(other, tmp_path)

    assert "privacy.epsilon" in str(ei.value) and "training.lr" in str(ei.value)


def test_new_folder_is_not_a_resume(tmp_path: Path) -> None:
    assert check_resumable(parse_study(small_study_dict()), tmp_path / "new") is None


def test_refused_resume_writes_nothing_into_the_run_folder(tmp_path: Path, capfd) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoint(run_dir, small_study_dict())
    write_yaml(run_dir / "config.yaml", parse_study(small_study_dict()).to_dict())
    before = _files(run_dir)
    other = write_yaml(tmp_path / "other.yaml", small_study_dict(federation={"rounds": 7}))

    rc = main(["simulate", "--config", str(other), "--out", str(run_dir)])

    _, err = capfd.readouterr()
    assert rc != 0 and "federation.rounds" in err and "Traceback" not in err
    assert _files(run_dir) == before  # config.yaml not overwritten, nothing added


def test_resume_without_config_takes_the_runs_own_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    own = small_study_dict(federation={"name": "own-study"}, output={"dir": str(tmp_path)})
    write_yaml(run_dir / "config.yaml", parse_study(own).to_dict())

    study, source = choose_study(None, run_dir)

    assert study.federation.name == "own-study" and source == run_dir.resolve() / "config.yaml"
    demo, demo_source = choose_study(None, tmp_path / "fresh")
    assert demo.federation.name == "pneumonia-demo" and demo_source.name == "demo.yaml"
