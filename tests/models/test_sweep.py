"""Issue 10: ``fedrad sweep`` runs one simulated study per value and draws them in one figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.common.config import parse_study
from fedrad.common.errors import ConfigError
from fedrad.server.cli import main
from fedrad.server.sweep import privacy_cost, with_field
from tests.conftest import small_study_dict


def test_with_field_validates_the_variant() -> None:
    s = parse_study(small_study_dict())

    assert with_field(s, "training.lr", 0.3).training.lr == 0.3
    assert with_field(s, "privacy.epsilon", 2).privacy.epsilon == 2.0
    with pytest.raises(ConfigError, match="training.lrr"):
        with_field(s, "training.lrr", 0.3)
    with pytest.raises(ConfigError, match="training.lr"):
        with_field(s, "training.lr", -1)


def test_privacy_cost_states_that_every_variant_spends_the_budget() -> None:
    text = privacy_cost(parse_study(small_study_dict()), 4)

    assert "each of the 4 variants spends every site's budget" in text and "epsilon 32" in text


def test_sweep_cli_refuses_no_grid(tmp_path: Path, yaml_file, capfd) -> None:  # type: ignore[no-untyped-def]
    cfg = yaml_file(tmp_path / "s.yaml", small_study_dict())

    assert main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --lr or --grid" in capfd.readouterr().err


@pytest.mark.slow
def test_sweep_writes_its_figure(tmp_path: Path, yaml_file) -> None:  # type: ignore[no-untyped-def]
    cfg = yaml_file(tmp_path / "s.yaml", small_study_dict(
        federation={"name": "sweep", "num_hospitals": 2, "rounds": 1, "min_hospitals": 1, "seed": 1}))
    out = tmp_path / "sweep"

    rc = main(["sweep", "--config", str(cfg), "--lr", "0.01", "0.1", "--out", str(out)])

    assert rc == 0
    assert (out / "sweep.png").stat().st_size > 10_000
    summary = json.loads((out / "sweep.json").read_text())
    assert [v["value"] for v in summary["variants"]] == [0.01, 0.1]
    assert all(v["status"] == "completed" and v["pooled_validation"]["1"]["auc"] is not None
               for v in summary["variants"])
    assert len({v["run_dir"] for v in summary["variants"]}) == 2  # fresh ledgers per variant
    assert "spends every site's budget" in summary["privacy"]
