"""A simulated federation whose hospitals enforce a node policy and keep an audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.client.governance.audit_log import AuditLog
from fedrad.server.cli import main as fedrad_main

STUDY = """
federation: {{name: policy-sim, num_hospitals: 2, rounds: 2, min_hospitals: 2}}
model: {{name: cnn, options: {{widths: [8, 16, 32], dense: 32}}}}
data: {{max_train_per_hospital: 128, max_val_per_hospital: 32, max_test: 64, class_names: [normal, pneumonia]}}
privacy: {{epsilon: {epsilon}}}
training: {{batch_size: 32, lr: 0.05}}
simulation: {{node_policy: policy.yaml}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [4.0, 9.0])
def test_hospitals_enforce_policy_and_audit_what_they_send(tmp_path: Path, epsilon: float) -> None:
    (tmp_path / "policy.yaml").write_text("policy:\n  max_epsilon_per_study: 5\n  max_epsilon_lifetime: 5\n")
    (tmp_path / "study.yaml").write_text(STUDY.format(epsilon=epsilon))
    out = tmp_path / "run"

    rc = fedrad_main(["simulate", "--config", str(tmp_path / "study.yaml"), "--out", str(out)])

    metrics = json.loads((out / "metrics.json").read_text())
    logs = sorted((out / "sites").glob("hospital-*/audit.jsonl"))
    assert len(logs) == 2
    for path in logs:
        log = AuditLog(path, key_file=path.parent / "audit.key")  # simulation: the site's own key
        assert log.verify() == []
        entries = log.entries()
        assert all(e["policy_version"] for e in entries)
    if epsilon <= 5:  # inside the policy: trained, every sent message is in the log
        assert rc == 0 and metrics["status"] == "completed"
        for path in logs:
            kinds = [(e["kind"], e["outcome"]) for e in AuditLog(path).entries()]
            # round 1's model is evaluated inside round 2's train message, the final model on its own
            assert kinds.count(("train", "sent")) == 2 and kinds.count(("evaluate", "sent")) == 1
            assert kinds.count(("evaluate", "sent (in the train reply)")) == 1
            sent = [e for e in AuditLog(path).entries() if e["kind"] == "train"]
            assert all(e["arrays"] and e["bytes_sent"] > 0 for e in sent)
            assert sent[-1]["epsilon_after"] <= 4.0 + 1e-6
    else:  # outside: every hospital refuses round 1 before training, nothing is spent, the study stops
        assert rc == 1 and metrics["status"].startswith("stopped")
        statuses = [h["status"] for h in metrics["rounds"][0]["hospitals"].values()]
        assert statuses and all("rule max_epsilon_per_study" in s for s in statuses)
        for path in logs:
            entries = AuditLog(path).entries()
            assert entries and all(e["outcome"].startswith("refused") and not e["arrays"] for e in entries)
            ledger_path = path.parent / "privacy-ledger.json"  # the static rules refuse before it is even opened
            assert not ledger_path.exists() or json.loads(ledger_path.read_text())["entries"] == []
