"""The per-site privacy ledger: the accountant state of one hospital's dataset, on disk.

* Epsilon is cumulative across rounds, studies and process restarts.
* Work is *reserved* (written to disk) before any training step runs, so a kill at any moment
  never lowers the recorded epsilon; at worst it over-counts a round that did not finish.
* Writes are atomic (temp file, fsync, rename, fsync of the folder) and serialised with a lock.
* Two budgets: the ledger's own (``budget_epsilon``) is the dataset's **lifetime** budget,
  composed over every study that ever used the dataset; a study's epsilon is composed over that
  study's entries only and capped by what the study asked for (``study_budget``). Work over
  either is refused with :class:`BudgetExceededError`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.common.durable import atomic_write_json, locked
from fedrad.common.errors import BudgetExceededError, LedgerError, PrivacyError
from fedrad.common.privacy import ACCOUNTANTS, HistoryEntry, epsilon_for

log = logging.getLogger(__name__)
LEDGER_VERSION = 1


@dataclass(frozen=True)
class Reservation:
    epsilon_before: float
    epsilon_after: float
    budget: float
    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyLedger:
    """One site's ledger file. Open with :meth:`open`; all mutating calls are keyword-only."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self._data = data

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | Path, *, budget_epsilon: float, delta: float, accountant: str = "rdp", dataset_id: str = ""
    ) -> "PrivacyLedger":
        """Open (or create) the ledger at ``path`` for a site with the given budget."""
        if not budget_epsilon > 0:
            raise PrivacyError(f"budget_epsilon must be > 0, got {budget_epsilon!r}")
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}")
        p = Path(path)
        with locked(p):
            if p.exists():
                data = cls._read(p)
                for key, want in (("delta", delta), ("accountant", accountant), ("dataset_id", dataset_id)):
                    if data.get(key) != want:
                        raise LedgerError(
                            f"{p}: ledger was opened with {key}={data.get(key)!r} but this work asks for {want!r}; "
                            "a ledger accounts for one dataset under one (accountant, delta)"
                        )
                if data["budget_epsilon"] != budget_epsilon:
                    log.warning(
                        "ledger %s: budget changed from %g to %g by site configuration",
                        p.name, data["budget_epsilon"], budget_epsilon,
                    )
                    data["budget_epsilon"] = budget_epsilon
                    atomic_write_json(p, data)
            else:
                data = {
                    "version": LEDGER_VERSION,
                    "budget_epsilon": budget_epsilon,
                    "delta": delta,
                    "accountant": accountant,
                    "dataset_id": dataset_id,
                    "history": [],
                    "entries": [],
                    "created": time.time(),
                }
                atomic_write_json(p, data)
        return cls(p, data)

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        """Open an existing ledger read-only (for inspection; :meth:`open` to account new work)."""
        p = Path(path)
        if not p.exists():
            raise LedgerError(f"{p}: no such privacy ledger")
        return cls(p, cls._read(p))

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: privacy ledger unreadable ({exc}); refusing to train without it") from None
        if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION or "history" not in data:
            raise LedgerError(f"{path}: not a fedrad privacy ledger (version {LEDGER_VERSION})")
        return data

    def _reload(self) -> None:
        self._data = self._read(self.path)

    # ------------------------------------------------------------------ queries
    @property
    def budget(self) -> float:
        return float(self._data["budget_epsilon"])

    @property
    def delta(self) -> float:
        return float(self._data["delta"])

    @property
    def accountant(self) -> str:
        return str(self._data["accountant"])

    @property
    def history(self) -> list[HistoryEntry]:
        return [(float(s), float(q), int(n)) for s, q, n in self._data["history"]]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"]]

    def spent(self) -> float:
        """Cumulative (lifetime) epsilon recorded so far, over every study."""
        return epsilon_for(history=self.history, delta=self.delta, accountant=self.accountant)

    def history_of(self, study: str) -> list[HistoryEntry]:
        """The work recorded for one study (its entries, in order)."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self._data["entries"] if e["study"] == study]

    def spent_by(self, study: str) -> float:
        """Epsilon of one study's own work on this dataset."""
        return epsilon_for(history=self.history_of(study), delta=self.delta, accountant=self.accountant)

    def preview(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would reach after the given extra work (nothing is written)."""
        return epsilon_for(
            history=self.history + [(noise_multiplier, sample_rate, steps)], delta=self.delta, accountant=self.accountant
        )

    # ------------------------------------------------------------------ mutation
    def reserve(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, study: str, round: int,
        study_budget: float | None = None,
    ) -> Reservation:
        """Record the work *before* it runs; refuse it if it would exceed the dataset's lifetime
        budget or (when given) ``study_budget`` for this study's own work."""
        if study_budget is not None and not study_budget > 0:
            raise PrivacyError(f"study_budget must be > 0, got {study_budget!r}")
        with locked(self.path):
            self._reload()
            before = self.spent()
            after = self.preview(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
            if after > self.budget * (1 + 1e-9):
                raise BudgetExceededError(
                    f"round {round} would take the dataset's epsilon from {before:.4g} to {after:.4g}, over the "
                    f"site's lifetime budget of {self.budget:g} (delta={self.delta:g}); round refused"
                )
            if study_budget is not None:
                study_after = epsilon_for(history=self.history_of(study) + [(noise_multiplier, sample_rate, steps)],
                                          delta=self.delta, accountant=self.accountant)
                if study_after > study_budget * (1 + 1e-9):
                    raise BudgetExceededError(
                        f"round {round} would take study {study}'s epsilon to {study_after:.4g}, over the "
                        f"{study_budget:g} it asked for (delta={self.delta:g}); round refused"
                    )
            self._data["history"].append([float(noise_multiplier), float(sample_rate), int(steps)])
            self._data["entries"].append(
                {
                    "time": time.time(),
                    "study": study,
                    "round": int(round),
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "epsilon_before": before,
                    "epsilon_after": after,
                }
            )
            atomic_write_json(self.path, self._data)
        log.info("ledger %s: reserved %d steps, epsilon %.4g -> %.4g of %g", self.path.name, steps, before, after, self.budget)
        return Reservation(before, after, self.budget, float(noise_multiplier), float(sample_rate), int(steps))

    def accountant_state(self) -> dict[str, Any]:
        """The Opacus accountant ``state_dict()`` equivalent of this ledger."""
        return {"history": self.history, "mechanism": self.accountant}
