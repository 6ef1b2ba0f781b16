"""The per-site privacy ledger (client/privacy/ledger.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import fedrad.common.durable as durable_mod
from fedrad.client.privacy.ledger import PrivacyLedger
from fedrad.common.errors import BudgetExceededError, LedgerError, PrivacyError
from fedrad.common.privacy import epsilon_for

DELTA = 1e-5
WORK = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 20}


def _open(path: Path, **kw) -> PrivacyLedger:
    args = {"budget_epsilon": 8.0, "delta": DELTA, "accountant": "rdp", "dataset_id": "ds-1", **kw}
    return PrivacyLedger.open(path, **args)


def test_new_ledger_spends_nothing_and_exists_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.json"

    led = _open(path)

    assert led.spent() == 0.0
    assert led.history == []
    assert path.exists()
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["entries"] == [] and data["studies"] == {}
    assert data["budget_epsilon"] == 8.0 and data["dataset_id"] == "ds-1" and data["released_size"] is None


def test_reserve_raises_epsilon_and_writes_to_disk(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)

    res = led.reserve(**WORK, study="s1", round=1)

    expected = epsilon_for(history=[(1.0, 0.1, 20)], delta=DELTA)
    assert res.epsilon_before == 0.0
    assert res.epsilon_after == pytest.approx(expected, rel=1e-12)
    assert led.spent() == pytest.approx(expected, rel=1e-12)
    on_disk = json.loads(path.read_text())
    (entry,) = on_disk["entries"]
    assert (entry["noise_multiplier"], entry["sample_rate"], entry["steps"]) == (1.0, 0.1, 20)
    assert entry["round"] == 1 and entry["study"] == "s1" and entry["account"] == "train"
    assert on_disk["entries"][0]["epsilon_after"] == pytest.approx(expected)


def test_reopen_after_restart_reports_same_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = _open(path)
    first.reserve(**WORK, study="s", round=1)
    first.reserve(**WORK, study="s", round=2)
    eps = first.spent()
    del first

    again = _open(path)  # a new process would do exactly this

    assert again.spent() == pytest.approx(eps, rel=1e-12)
    assert len(again.entries) == 2
    assert again.spent() > 0


def test_two_handles_on_one_file_do_not_lose_reservations(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    a, b = _open(path), _open(path)

    a.reserve(**WORK, study="s", round=1)
    b.reserve(**WORK, study="s", round=2)  # b reloads under the lock before appending

    assert len(_open(path).history) == 2


def test_reserve_over_budget_refused_file_bytes_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path, budget_epsilon=2.0)
    led.reserve(noise_multiplier=2.0, sample_rate=0.1, steps=10, study="s", round=1)
    before = path.read_bytes()
    spent = led.spent()

    with pytest.raises(BudgetExceededError, match="over the site's lifetime budget"):
        led.reserve(noise_multiplier=0.5, sample_rate=0.5, steps=100, study="s", round=2)

    assert path.read_bytes() == before
    assert led.spent() == spent
    assert _open(path, budget_epsilon=2.0).spent() == spent


def test_zero_noise_is_infinite_epsilon_and_refused(tmp_path: Path) -> None:
    led = _open(tmp_path / "l.json")
    with pytest.raises(BudgetExceededError):
        led.reserve(noise_multiplier=0.0, sample_rate=0.1, steps=1, study="s", round=1)


def test_crash_during_replace_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)
    led.reserve(**WORK, study="s", round=1)
    before_bytes = path.read_bytes()
    before_eps = _open(path).spent()

    def boom(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("simulated crash")

    monkeypatch.setattr(durable_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        led.reserve(**WORK, study="s", round=2)
    monkeypatch.undo()

    assert path.read_bytes() == before_bytes
    after = _open(path)
    assert after.spent() == pytest.approx(before_eps)
    assert after.spent() >= before_eps  # never decreases
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_crash_during_json_dump_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)
    led.reserve(**WORK, study="s", round=1)
    before_bytes = path.read_bytes()
    eps_history = [led.spent()]
    real_fdopen = os.fdopen

    class Torn:  # the process dies half-way through writing the temporary file
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(durable_mod.os, "fdopen", lambda fd, *a, **k: Torn(real_fdopen(fd, *a, **k)))
    with pytest.raises(KeyboardInterrupt):
        led.reserve(**WORK, study="s", round=2)
    monkeypatch.undo()

    assert path.read_bytes() == before_bytes
    reopened = _open(path)
    eps_history.append(reopened.spent())
    reopened.reserve(**WORK, study="s", round=2)
    eps_history.append(_open(path).spent())
    assert eps_history == sorted(eps_history)
    assert eps_history[-1] > eps_history[0]


def test_corrupt_ledger_file_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "histo', encoding="utf-8")

    with pytest.raises(LedgerError, match="unreadable"):
        _open(path)


@pytest.mark.parametrize("content", ["[]", '{"version": 99, "history": []}', '{"version": 1}', '{"version": 2}'])
def test_foreign_json_is_a_ledger_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(LedgerError, match="not a fedrad privacy ledger"):
        _open(path)


def test_ledger_corrupted_after_open_is_detected_on_reserve(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)
    path.write_text("garbage", encoding="utf-8")

    with pytest.raises(LedgerError):
        led.reserve(**WORK, study="s", round=1)


def test_mismatched_dataset_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _open(path).reserve(**WORK, study="s", round=1)
    before = path.read_bytes()

    with pytest.raises(LedgerError, match="dataset_id"):
        _open(path, dataset_id="other-dataset")

    assert path.read_bytes() == before


@pytest.mark.parametrize("change", [{"delta": 1e-6}, {"delta": 1e-4}, {"accountant": "prv"}])
def test_delta_and_accountant_follow_the_node_and_re_evaluate_the_same_history(tmp_path: Path, change: dict) -> None:
    """Issue 9 (point 9): the first study no longer fixes delta/accountant for ever. The history is
    delta-free, so the node's (changed) setting re-evaluates it soundly; nothing is lost."""
    path = tmp_path / "ledger.json"
    _open(path).reserve(**WORK, study="s", round=1)

    led = _open(path, **change)
    led.reserve(**WORK, study="s", round=2)

    args = {"delta": DELTA, "accountant": "rdp", **change}
    assert led.history == [(1.0, 0.1, 20)] * 2
    assert led.spent() == pytest.approx(epsilon_for(history=[(1.0, 0.1, 20)] * 2, **args), rel=1e-9)
    assert json.loads(path.read_text())[next(iter(change))] == next(iter(change.values()))


def test_version_1_ledger_is_migrated_never_dropped(tmp_path: Path, caplog) -> None:
    path = tmp_path / "ledger.json"
    v1 = {"version": 1, "budget_epsilon": 8.0, "delta": DELTA, "accountant": "rdp", "dataset_id": "ds-1",
          "history": [[1.0, 0.1, 20], [1.2, 0.1, 20]],
          "entries": [{"time": 1.0, "study": "old", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1,
                       "steps": 20, "epsilon_before": 0.0, "epsilon_after": 1.0}],
          "created": 1.0}
    path.write_text(json.dumps(v1), encoding="utf-8")

    with caplog.at_level("WARNING"):
        led = _open(path)

    assert "migrated from format version 1" in caplog.text
    assert led.history == [(1.0, 0.1, 20), (1.2, 0.1, 20)]  # the history is the authority: both kept
    data = json.loads(path.read_text())
    assert data["version"] == 2 and [e["account"] for e in data["entries"]] == ["train", "train"]
    assert [e["study"] for e in data["entries"]] == ["old", "?"]
    assert led.spent() == pytest.approx(epsilon_for(history=[(1.0, 0.1, 20), (1.2, 0.1, 20)], delta=DELTA))


def test_accounts_are_separate_and_each_held_to_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path, budget_epsilon=5.0)
    led.reserve(**WORK, study="s", round=1)
    train = led.spent("train")

    led.reserve(noise_multiplier=2.0, sample_rate=1.0, steps=1, study="s", round=1, account="val")

    assert led.spent("train") == train  # parallel composition: disjoint splits, separate accounts
    assert led.spent("val") == pytest.approx(epsilon_for(history=[(2.0, 1.0, 1)], delta=DELTA))
    assert led.history_of("s", "val") == [(2.0, 1.0, 1)]
    with pytest.raises(BudgetExceededError, match="val epsilon"):
        led.reserve(noise_multiplier=0.3, sample_rate=1.0, steps=5, study="s", round=2, account="val")
    with pytest.raises(PrivacyError, match="account"):
        led.reserve(**WORK, study="s", round=1, account="test")  # type: ignore[arg-type]


def test_size_release_is_charged_once_and_counts_in_every_study(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)

    led.release_size(value=123, noise_multiplier=8.0)

    assert _open(path).released_size == 123
    assert led.history == [(8.0, 1.0, 1)]
    assert led.history_of("any-study") == [(8.0, 1.0, 1)] and led.history_of("any-study", "val") == []
    with pytest.raises(LedgerError, match="already released"):
        led.release_size(value=124, noise_multiplier=8.0)
    assert _open(path).released_size == 123


def test_study_turns_are_counted_atomically_with_their_charge(tmp_path: Path) -> None:
    from fedrad.client.privacy.ledger import StudyTurn

    path = tmp_path / "ledger.json"
    led = _open(path)
    turn = StudyTurn(key="k" * 64, name="demo", kind="train", planned_rounds=2, planned_evaluations=3, expect_done=0)

    led.reserve(**WORK, study="k" * 64, round=1, turn=turn)
    stale = path.read_bytes()
    with pytest.raises(LedgerError, match="count changed"):  # planned with a stale count: refused, not charged
        led.reserve(**WORK, study="k" * 64, round=1, turn=turn)
    assert path.read_bytes() == stale
    led.reserve(**WORK, study="k" * 64, round=2, turn=StudyTurn(**{**turn.__dict__, "expect_done": 1}))
    with pytest.raises(BudgetExceededError, match="all its 2 train turns"):
        led.reserve(**WORK, study="k" * 64, round=3, turn=StudyTurn(**{**turn.__dict__, "expect_done": 2}))

    rec = _open(path).study("k" * 64)
    assert rec is not None and (rec.train_rounds, rec.evaluations, rec.planned_rounds) == (2, 0, 2)
    assert len(_open(path).entries) == 2
    with pytest.raises(Exception, match="max_studies"):
        led.count_turn(StudyTurn(key="z" * 64, name="new", kind="evaluate", planned_rounds=1, planned_evaluations=1,
                                 expect_done=0, max_studies=1))


def test_budget_change_is_accepted_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _open(path, budget_epsilon=8.0)

    led = _open(path, budget_epsilon=4.0)

    assert led.budget == 4.0
    assert json.loads(path.read_text())["budget_epsilon"] == 8.0  # opening writes nothing ...
    led.reserve(noise_multiplier=2.0, sample_rate=0.1, steps=5, study="s", round=1)
    assert json.loads(path.read_text())["budget_epsilon"] == 4.0  # ... the next reservation records it


def test_keyword_only_arguments(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    with pytest.raises(TypeError):
        PrivacyLedger.open(path, 8.0, DELTA)  # type: ignore[misc]
    led = _open(path)
    with pytest.raises(TypeError):
        led.reserve(1.0, 0.1, 20, "s", 1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        led.preview(1.0, 0.1, 20)  # type: ignore[misc]
    assert led.history == []


def test_ledger_file_mode_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    led.reserve(**WORK, study="s", round=1)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_preview_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _open(path)
    before = path.read_bytes()

    eps = led.preview(**WORK)

    assert eps > 0
    assert path.read_bytes() == before
    assert led.spent() == 0.0


@pytest.mark.parametrize(
    "kw", [{"budget_epsilon": 0.0}, {"delta": 0.0}, {"delta": 1.0}, {"accountant": "gdp"}]
)
def test_open_rejects_bad_arguments(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(PrivacyError):
        _open(tmp_path / "l.json", **kw)
    assert not (tmp_path / "l.json").exists()


def test_ledger_show_reports_accounts_studies_and_released_size(tmp_path: Path, capsys) -> None:
    from fedrad.client.cli import main as node_main
    from fedrad.client.privacy.ledger import StudyTurn

    path = tmp_path / "ledger.json"
    led = _open(path)
    led.release_size(value=99, noise_multiplier=8.0)
    led.reserve(**WORK, study="k" * 64, round=1,
                turn=StudyTurn(key="k" * 64, name="demo", kind="train", planned_rounds=3, planned_evaluations=4,
                               expect_done=0))
    led.reserve(noise_multiplier=2.0, sample_rate=1.0, steps=1, study="k" * 64, round=1, account="val")

    rc = node_main(["ledger", "show", str(path), "--json"])

    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["released_size"] == 99 and out["epsilon"] > 0 and out["epsilon_val"] > 0
    assert out["studies"][0]["train_rounds"] == 1 and out["studies"][0]["planned_rounds"] == 3
    assert node_main(["ledger", "show", str(path)]) == 0
    assert "demo" in capsys.readouterr().out
