"""Issue 10: a study whose class_names do not cover a site's labels is refused before anything
is spent (it used to fail mid-run with an IndexError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrad.client.runtime import app as client_app
from tests.adversarial.test_node_kit import message, sim_context, study


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_class_name_mismatch_refused_before_the_ledger_is_touched(tmp_path: Path, kind: str) -> None:
    s = study(data={"class_names": ["normal"]})

    reply = getattr(client_app, "train" if kind == "train" else "evaluate_global")(
        message(s, kind, tmp_path), sim_context())

    assert reply.has_error()
    assert "class_names" in reply.error.reason and "IndexError" not in reply.error.reason
    assert not (tmp_path / "hospital-1" / "privacy-ledger.json").exists()
