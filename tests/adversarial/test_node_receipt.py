"""Every reply carries the node's audit receipt (its audit-log head right after recording the reply).

Issue 9 point 6 is the gate helper's (the keyed chain); the node side is here: the receipt is
attached exactly when :meth:`AuditLog.append` returns the contract's ``AuditHead`` (``.head``,
``.count``), it is checked by ``check_reply``'s rules, and a reply whose audit fails never leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedrad.client.governance.audit_log import AuditLog
from fedrad.client.runtime import app as client_app
from fedrad.common.errors import AuditError
from fedrad.common.protocol import ERR_REFUSED, check_receipt
from tests.adversarial.test_node_kit import message, sim_context, study


@dataclass(frozen=True)
class _Head:  # the contract's AuditHead(head, count), until the gate helper's AuditLog returns it
    head: str
    count: int


class _ContractLog(AuditLog):
    def append(self, **kw: Any) -> Any:  # type: ignore[override]
        result = super().append(**kw)
        if hasattr(result, "head"):
            return result
        return _Head(head=str(result["hash"]), count=int(result["seq"]))


def test_train_and_evaluate_replies_carry_the_audit_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_app, "AuditLog", _ContractLog)
    s = study()

    train = client_app.train(message(s, "train", tmp_path), sim_context())
    evaluate = client_app.evaluate_global(message(s, "evaluate", tmp_path), sim_context())

    entries = AuditLog(tmp_path / "hospital-1" / "audit.jsonl").entries()
    for n, reply in enumerate((train, evaluate), 1):
        assert not reply.has_error(), reply.error.reason
        receipt = reply.content["receipt"]
        check_receipt(receipt)
        assert receipt["audit-count"] == n and receipt["audit-head"] == entries[n - 1]["hash"]


def test_a_reply_that_cannot_be_audited_is_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class _Broken(AuditLog):
        def append(self, **kw: Any) -> Any:  # type: ignore[override]
            if kw.get("outcome") == "sent":
                raise AuditError("log and head disagree")
            return super().append(**kw)

    monkeypatch.setattr(client_app, "AuditLog", _Broken)

    reply = client_app.train(message(study(), "train", tmp_path), sim_context())

    assert reply.has_error() and reply.error.code == ERR_REFUSED and not reply.has_content()
