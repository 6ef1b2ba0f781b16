"""How a running study reports progress. The CLI plugs in a rich display; tests a silent one."""

from __future__ import annotations

from typing import Protocol

from .history import RoundRecord, StudyHistory


class Reporter(Protocol):
    def study_started(self, *, name: str, first_round: int, total_rounds: int, hospitals: int) -> None: ...
    def round_started(self, round: int) -> None: ...
    def round_finished(self, record: RoundRecord, history: StudyHistory) -> None: ...
    def study_finished(self, history: StudyHistory) -> None: ...


class NullReporter:
    def study_started(self, *, name: str, first_round: int, total_rounds: int, hospitals: int) -> None:
        pass

    def round_started(self, round: int) -> None:
        pass

    def round_finished(self, record: RoundRecord, history: StudyHistory) -> None:
        pass

    def study_finished(self, history: StudyHistory) -> None:
        pass


def notify(reporter: Reporter, text: str) -> None:
    """Show ``text`` (a warning for the operator) if ``reporter`` can; reporters without a
    ``note`` method (older ones) skip it: the warning is in the run's events either way."""
    note = getattr(reporter, "note", None)
    if callable(note):
        note(text)
