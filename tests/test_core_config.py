"""StudyConfig loading and validation (common/config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from fedrad import bundled_path
from fedrad.common.config import StudyConfig, load_study, parse_study, study_from_json
from fedrad.common.errors import ConfigError, FedradError


def _problems(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(exc_info.value.problems)


def test_defaults_load_from_empty_mapping_and_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")

    from_file = load_study(empty)
    from_none = parse_study(None)

    assert from_none == StudyConfig()
    assert from_file.federation == StudyConfig().federation
    assert from_file.privacy.epsilon == 8.0
    assert from_file.privacy.delta == 1e-5
    assert from_file.model.name == "scatter-cnn"  # the default at epsilon 8 (issue 10)
    # relative output dir resolved against the YAML folder
    assert Path(from_file.output.dir) == (tmp_path / "runs").resolve()


def test_bundled_demo_config_loads() -> None:
    study = load_study(bundled_path("configs", "demo.yaml"))

    assert study.federation.num_hospitals == 3
    assert study.privacy.enabled is True
    assert study.data.class_names == ("normal", "pneumonia")


def test_unknown_top_level_key_names_file_field_and_value(tmp_path: Path, yaml_file) -> None:
    path = yaml_file(tmp_path / "study.yaml", {"federation": {"rounds": 2}, "privcy": {"epsilon": 3}})

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    text = _problems(ei)
    assert ei.value.source == str(path)
    assert len(ei.value.problems) == 1
    assert str(path) in text
    assert "privcy" in text
    assert "unknown key" in text
    assert "'epsilon': 3" in text  # the bad value is shown


def test_unknown_nested_key_uses_dotted_path(tmp_path: Path, yaml_file) -> None:
    path = yaml_file(tmp_path / "study.yaml", {"privacy": {"epsilonn": 4.5}})

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    (problem,) = ei.value.problems
    assert str(path) in problem
    assert "privacy.epsilonn" in problem
    assert "4.5" in problem


def test_several_errors_are_collected_at_once(tmp_path: Path, yaml_file) -> None:
    path = yaml_file(
        tmp_path / "study.yaml",
        {
            "federation": {"rounds": 0, "num_hospitals": "three"},
            "privacy": {"epsilon": -1.0, "delta": 2.0, "accountant": "moments"},
            "training": {"batch_size": 0, "optimizer": "rmsprop"},
            "data": {"partition": {"scheme": "random"}},
        },
    )

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    text = _problems(ei)
    for field, value in [
        ("federation.rounds", "0"),
        ("federation.num_hospitals", "'three'"),
        ("privacy.epsilon", "-1.0"),
        ("privacy.delta", "2.0"),
        ("privacy.accountant", "'moments'"),
        ("training.batch_size", "0"),
        ("training.optimizer", "'rmsprop'"),
        ("data.partition.scheme", "'random'"),
    ]:
        line = next((p for p in ei.value.problems if f": {field}:" in p), None)
        assert line is not None, f"{field} not reported in:\n{text}"
        assert str(path) in line
        assert f"(got {value})" in line
    assert len(ei.value.problems) == 8


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("federation", {"fraction_train": 0.0}, "federation.fraction_train"),
        ("federation", {"fraction_train": 1.5}, "federation.fraction_train"),
        ("privacy", {"epsilon": 0}, "privacy.epsilon"),
        ("privacy", {"noise_multiplier": -0.1}, "privacy.noise_multiplier"),
        ("privacy", {"max_grad_norm": 0}, "privacy.max_grad_norm"),
        ("training", {"momentum": 1.0}, "training.momentum"),
        ("training", {"lr": "fast"}, "training.lr"),
        ("data", {"channels": 4}, "data.channels"),
        ("data", {"image_size": 4}, "data.image_size"),
        ("data", {"augmentation": {"hflip": 1.5}}, "data.augmentation.hflip"),
        ("privacy", {"enabled": "perhaps"}, "privacy.enabled"),
    ],
)
def test_bad_types_and_ranges(section: str, values: dict, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_study({section: values}, source="cfg.yaml")

    assert any(p.startswith(f"cfg.yaml: {field}:") for p in ei.value.problems), ei.value.problems


def test_cross_field_rule_min_hospitals() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_study({"federation": {"num_hospitals": 2, "min_hospitals": 3}}, source="x.yaml")

    assert "min_hospitals (3) exceeds num_hospitals (2)" in _problems(ei)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    assert "expected a mapping, got list" in _problems(ei)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    assert ei.value.problems == [f"{path}: file not found"]
    assert ei.value.exit_code == 2
    assert isinstance(ei.value, FedradError)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("federation: {rounds: 3\nprivacy: [\n", encoding="utf-8")

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    (problem,) = ei.value.problems
    assert problem.startswith(f"{path}: not valid YAML")


def test_relative_data_path_resolves_against_yaml_folder(tmp_path: Path, yaml_file, monkeypatch) -> None:
    cfg_dir = tmp_path / "configs" / "nested"
    path = yaml_file(cfg_dir / "study.yaml", {"data": {"path": "../data/set.npz"}, "output": {"dir": "out"}})
    monkeypatch.chdir(tmp_path)  # the CWD must not matter

    study = load_study(path)

    assert Path(study.data.path) == (tmp_path / "configs" / "data" / "set.npz").resolve()
    assert Path(study.output.dir) == (cfg_dir / "out").resolve()


def test_absolute_data_path_kept(tmp_path: Path, yaml_file) -> None:
    target = tmp_path / "elsewhere" / "x.npz"
    path = yaml_file(tmp_path / "s.yaml", {"data": {"path": str(target)}})

    assert load_study(path).data.path == str(target)


def test_unknown_model_name_reported(tmp_path: Path, yaml_file) -> None:
    path = yaml_file(tmp_path / "s.yaml", {"model": {"name": "vgg99"}})

    with pytest.raises(ConfigError) as ei:
        load_study(path)

    (problem,) = ei.value.problems
    assert str(path) in problem
    assert "model.name" in problem
    assert "'vgg99'" in problem
    assert "cnn" in problem and "resnet18" in problem  # the known names are listed


def test_dicom_source_needs_path() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_study({"data": {"source": "dicom"}}, source="d.yaml")

    assert "data.path" in _problems(ei)


def test_config_is_frozen() -> None:
    study = parse_study({})

    with pytest.raises(pydantic.ValidationError):
        study.privacy.epsilon = 100.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        study.federation = study.federation  # type: ignore[misc]
    assert study.privacy.epsilon == 8.0


def test_json_round_trip_and_fingerprint() -> None:
    study = parse_study({"federation": {"rounds": 7}, "model": {"name": "resnet", "options": {"width": 8}}})

    back = study_from_json(study.to_json())

    assert back == study
    assert back.fingerprint() == study.fingerprint()
    assert parse_study({"federation": {"rounds": 8}}).fingerprint() != study.fingerprint()
    assert json.loads(study.to_json())["federation"]["rounds"] == 7


def test_study_from_json_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        study_from_json("{not json")
    with pytest.raises(ConfigError) as ei:
        study_from_json(json.dumps({"privacy": {"epsilon": "lots"}}))
    assert "privacy.epsilon" in _problems(ei)


def test_reproducible_randomness_switch_is_off_by_default_and_typed(study_dict) -> None:
    from fedrad.common.config import parse_study
    from fedrad.common.errors import ConfigError

    assert parse_study(study_dict()).simulation.reproducible_randomness is False
    assert parse_study(study_dict(simulation={"reproducible_randomness": True})).simulation.reproducible_randomness
    with pytest.raises(ConfigError, match="simulation.reproducible_randomness"):
        parse_study(study_dict(simulation={"reproducible_randomness": "sometimes"}))


def test_every_config_error_in_one_report_with_the_closest_valid_name(tmp_path: Path) -> None:
    # arrange: a schema error, two misspelt keys, a misspelt model and a misspelt strategy
    f = tmp_path / "study.yaml"
    f.write_text("federation: {rounds: 0, num_hospitls: 3}\nstrategy: {name: fedavgg}\nmodel: {name: resnt}\n"
                 "privacy: {epsilonn: 3}\n")
    # act
    with pytest.raises(ConfigError) as ei:
        load_study(f)
    # assert: all five at once, each naming the file and the dotted field, with a suggestion where one exists
    text = "\n".join(ei.value.problems)
    assert len(ei.value.problems) == 5
    assert "federation.rounds" in text
    assert "federation.num_hospitls: unknown key (value 3); did you mean 'num_hospitals'?" in text
    assert "privacy.epsilonn: unknown key (value 3); did you mean 'epsilon'?" in text
    assert "model.name: unknown model (got 'resnt'" in text and "did you mean 'resnet'?" in text
    assert "strategy.name: unknown strategy (got 'fedavgg'" in text and "did you mean 'fedavg'?" in text
    assert all(p.startswith(str(f)) for p in ei.value.problems)


def test_strategy_names_known_to_the_config_are_the_coordinators_registry() -> None:
    from fedrad.common.config import STRATEGY_NAMES
    from fedrad.server.strategies import STRATEGIES

    assert set(STRATEGY_NAMES) == set(STRATEGIES)


def test_a_study_that_sets_only_epsilon_gets_the_budget_s_model() -> None:
    high, low, nodp = parse_study({"privacy": {"epsilon": 8}}), parse_study({"privacy": {"epsilon": 1}}), \
        parse_study({"privacy": {"enabled": False}})

    assert (high.model.name, high.training.lr) == ("scatter-cnn", 0.1)
    assert (low.model.name, low.training.lr) == ("scatter-linear", 0.05)
    assert nodp.model.name == "scatter-cnn"
    for study in (high, low):
        assert study.training.class_weighting == "balanced" and study.data.augmentation.enabled
        assert study.training.batch_size == 128 and study.federation.rounds == 10


def test_what_a_study_sets_is_kept() -> None:
    study = parse_study({"privacy": {"epsilon": 1}, "model": {"name": "cnn"}, "training": {"lr": 0.3}})

    assert (study.model.name, study.training.lr) == ("cnn", 0.3)


def test_the_demo_sets_no_training_choice_so_it_measures_the_defaults() -> None:
    import yaml

    raw = yaml.safe_load(bundled_path("configs", "demo.yaml").read_text(encoding="utf-8"))

    assert set(raw) <= {"federation", "data", "privacy"}
    assert set(raw["privacy"]) == {"epsilon"}
    assert set(raw["data"]) <= {"source", "path", "class_names", "partition"}


def test_weight_standardisation_with_the_ew_engine_is_refused_up_front() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_study({"model": {"name": "cnn", "options": {"weight_standardization": True}},
                     "privacy": {"grad_sample_mode": "ew"}})

    assert "weight_standardization" in _problems(ei) and "grad_sample_mode" in _problems(ei)


@pytest.mark.parametrize("raw", [None, {"privacy": {"epsilon": 1}}, {"privacy": {"enabled": False}},
                                 {"training": {"class_weighting": "none"}, "data": {"augmentation": {}}}])
def test_a_study_round_trips_through_its_own_dict(raw: dict | None) -> None:
    study = parse_study(raw)

    assert parse_study(study.to_dict()) == study
    assert study_from_json(study.to_json()) == study
