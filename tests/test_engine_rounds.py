"""Two train rounds through the real ClientApp with fedrad's DP engine as the default (issue 14),
and with augmentation multiplicity and class weighting on (issue 10). Drives the node's train
handler directly (no Ray), as the adversarial node tests do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrad.client.runtime import app as client_app
from fedrad.common.config import PrivacyConfig
from fedrad.common.protocol import TRAIN_METRICS
from tests.adversarial.test_node_kit import flat, global_arrays, message, sim_context, sim_ledger, study

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "k2-balanced-augmented": {
        "training": {"batch_size": 16, "lr": 0.05, "momentum": 0.0, "device": "cpu", "num_threads": 1,
                     "augmentation_multiplicity": 2, "class_weighting": "balanced"},
        "data": {"max_train_per_hospital": 64, "max_val_per_hospital": 32, "max_test": 64,
                 "class_names": ["normal", "pneumonia"], "partition": {"scheme": "iid", "min_per_hospital": 16},
                 "augmentation": {"hflip": 0.5, "rotate_deg": 5.0}},
    },
}


def test_the_default_engine_is_fedrads_mixed_engine() -> None:
    assert PrivacyConfig().grad_sample_mode == "mixed"
    assert study().privacy.grad_sample_mode == "mixed"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_rounds_train_with_the_default_engine(tmp_path: Path, variant: str) -> None:
    # arrange
    s = study(**VARIANTS[variant])
    start = flat(global_arrays(s))
    eps, moved = [], []
    # act
    for rnd in (1, 2):
        reply = client_app.train(message(s, "train", tmp_path, server_round=rnd), sim_context())
        # assert (per round): a valid reply, the planned steps, the model moved
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) <= TRAIN_METRICS and metrics["round"] == rnd
        eps.append(metrics["epsilon"])
        after = flat(reply.content["arrays"])
        assert np.isfinite(after).all()
        moved.append(float(np.linalg.norm(after - start)))
    # assert: charged every round, within budget; the ledger holds the steps that were sent
    ledger = sim_ledger(tmp_path)
    rounds = [e for e in ledger["entries"] if not e["study"].startswith("<")]
    assert 0 < eps[0] < eps[1] <= s.privacy.epsilon
    assert len(rounds) == 2 and all(e["steps"] >= 1 for e in rounds)
    assert all(m > 0 for m in moved)
