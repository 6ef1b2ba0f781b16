"""Fixtures for the clinic tests (predict, explain, report): a briefly trained model on real images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrad import bundled_path
from fedrad.common.datasets import ImageSplit, load_npz
from fedrad.common.models import build_model

os.environ.setdefault("OMP_NUM_THREADS", "2")

MODEL = {"name": "cnn", "options": {"widths": [8, 16, 32], "dense": 32}}
CLASSES = ["normal", "pneumonia"]


@dataclass(frozen=True)
class Trained:
    model: torch.nn.Module
    train: ImageSplit
    test: ImageSplit


def train_briefly(steps: int = 120, seed: int = 0, lr: float = 1e-3) -> Trained:
    """A small CNN trained (no DP, Adam) for ``steps`` minibatches of real PneumoniaMNIST images."""
    splits = load_npz(bundled_path("data", "pneumoniamnist.npz"))
    torch.manual_seed(seed)
    model = build_model(MODEL["name"], in_channels=1, num_classes=2, image_size=28, options=MODEL["options"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    train = splits["train"]
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(train), size=64, replace=False)
        x = torch.from_numpy(np.asarray(train.images[idx]))
        y = torch.from_numpy(np.asarray(train.labels[idx]))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return Trained(model=model.eval(), train=train, test=splits["test"])


@pytest.fixture(scope="session")
def trained() -> Trained:
    torch.set_num_threads(1)  # a shared, busy CI box: one thread spins least
    return train_briefly()


def study_dict(**data: object) -> dict[str, object]:
    return {"federation": {"name": "clinic-test", "num_hospitals": 2, "rounds": 1},
            "model": MODEL, "data": {"source": "npz", "image_size": 28, "channels": 1, "class_names": CLASSES, **data}}


def save_model(path: Path, model: torch.nn.Module, *, card: dict[str, object] | None = None,
               study: dict[str, object] | None = None) -> Path:
    """A model.pt as finish_study writes it (today's layout), with a model card when given."""
    doc: dict[str, object] = {"state_dict": model.state_dict(), "study": study or study_dict(), "round": 1,
                              "class_names": CLASSES}
    if card is not None:
        doc["model_card"] = card
    torch.save(doc, path)
    return path
