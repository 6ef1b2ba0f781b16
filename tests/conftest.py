"""Shared fixtures and helpers for the core (non-DICOM, non-deploy) test suite."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

# Keep the suite fast and deterministic on small CI boxes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", module="opacus")

SMALL_MODEL = {"name": "cnn", "options": {"widths": [8, 16], "dense": 16}}


def small_study_dict(**overrides: Any) -> dict[str, Any]:
    """A study small enough to train one DP round in well under a second."""
    d: dict[str, Any] = {
        "federation": {"name": "unit", "num_hospitals": 3, "rounds": 2, "min_hospitals": 1, "seed": 3},
        "model": dict(SMALL_MODEL),
        "data": {
            "max_train_per_hospital": 64,
            "max_val_per_hospital": 32,
            "max_test": 64,
            "class_names": ["normal", "pneumonia"],
            "partition": {"scheme": "iid", "min_per_hospital": 16},
            "augmentation": {},  # none: a unit study's flows stay exact (a test asks for more)
        },
        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5},
        "training": {"batch_size": 16, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1,
                     "class_weighting": "none"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(d.get(section), dict):
            d[section] = {**d[section], **values}
        else:
            d[section] = values
    return d


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def small_study():
    from fedrad.common.config import parse_study

    return parse_study(small_study_dict())


@pytest.fixture()
def study_dict():
    """Factory: ``study_dict(section={...})`` -> a small study mapping with overrides merged in."""
    return small_study_dict


@pytest.fixture()
def yaml_file():
    """Factory: ``yaml_file(path, data)`` writes ``data`` as YAML and returns the path."""
    return write_yaml
