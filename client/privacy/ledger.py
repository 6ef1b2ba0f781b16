"""The per-site privacy ledger: the accountant state of one hospital's dataset, and its own record
of every study, on disk.

* Epsilon is cumulative across rounds, studies and process restarts.
* Work is *reserved* (written to disk) before any training step runs or any statistic is
  released, so a kill at any moment never lowers the recorded epsilon; at worst it over-counts a
  round that did not finish.
* Writes are atomic (temp file, fsync, rename, fsync of the folder) and serialised with a lock.
* Two budgets: the ledger's own (``budget_epsilon``) is the dataset's **lifetime** budget,
  composed over every study that ever used the dataset; a study's epsilon is composed over that
  study's entries only and capped by what the study asked for (``study_budget``). Work over
  either is refused with :class:`BudgetExceededError`.
* Two accounts: ``train`` (DP-SGD on the training split, and the one-off release of its noisy
  size) and ``val`` (noisy evaluation histograms of the validation split). The two splits hold
  disjoint examples, so by parallel composition the guarantee a patient gets is the *larger* of
  the two accounts' epsilons, never their sum; each account is held to both budgets on its own.
* Studies (format version 2): the node's own record of each study, keyed by the study's content
  hash (:func:`fedrad.common.config.study_key`): planned rounds and evaluations, rounds trained
  and evaluations answered so far, first seen. Round numbers come from this record, never from
  the coordinator's message.
* Delta and accountant are *evaluation* settings, not identity: a history of
  (noise multiplier, sample rate, steps) triples can be evaluated soundly at any delta with either
  accountant, so the ledger follows the node's own settings (node.yaml ``privacy``; in simulation
  the study's) and records the change, instead of refusing every study with another delta.
* A version-1 ledger (training entries only) is migrated on open; nothing is dropped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedrad.common.durable import atomic_write_json, locked
from fedrad.common.errors import BudgetExceededError, LedgerError, PolicyViolation, PrivacyError
from fedrad.common.privacy import ACCOUNTANTS, HistoryEntry, epsilon_for

log = logging.getLogger(__name__)
LEDGER_VERSION = 2
Account = Literal["train", "val"]
ACCOUNTS: tuple[str, ...] = ("train", "val")
#: ``study`` of the entry that charges the one-off release of the training set's noisy size. It
#: belongs to the dataset, so it counts in every study's own account too (each study re-sends it).
SIZE_RELEASE = "<dataset-size>"
#: ``study`` of the entry that charges the one-off release of the training set's noisy per-class
#: counts (class weighting); like the size, it belongs to the dataset and counts in every study.
CLASS_COUNTS_RELEASE = "<dataset-class-counts>"
DATASET_RELEASES = (SIZE_RELEASE, CLASS_COUNTS_RELEASE)


@dataclass(frozen=True)
class Reservation:
    epsilon_before: float
    epsilon_after: float
    budget: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    #: The study's own epsilon (this account) after the work, when the reservation named a study budget.
    study_epsilon: float | None = None


@dataclass(frozen=True)
class StudyRecord:
    """What the node knows about one study, from its own ledger."""

    key: str
    name: str
    planned_rounds: int
    planned_evaluations: int
    train_rounds: int
    evaluations: int
    first_seen: float


@dataclass(frozen=True)
class StudyTurn:
    """One more round (``kind="train"``) or evaluation of a study, counted in the same atomic write as its charge.

    ``expect_done``: the count the caller planned with; if another request took the turn in the
    meantime the write is refused (the caller's plan is stale). ``max_studies``: a new study beyond
    this many distinct studies is refused (policy rule ``max_studies``).
    """

    key: str
    name: str
    kind: Literal["train", "evaluate"]
    planned_rounds: int
    planned_evaluations: int
    expect_done: int
    max_studies: int | None = None


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
        """Open (or create) the ledger at ``path`` for a site with the given budget.

        ``delta`` and ``accountant``: the node's own settings, at which every epsilon is evaluated
        (a change is logged and recorded with the next reservation; the stored history is
        delta-free, so this is sound). Opening an existing ledger writes nothing (a version-1
        ledger excepted: it is migrated), so a request refused afterwards leaves the file as it was.
        """
        if not budget_epsilon > 0:
            raise PrivacyError(f"budget_epsilon must be > 0, got {budget_epsilon!r}")
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {accountant!r}")
        p = Path(path)
        with locked(p):
            if p.exists():
                data, migrated = cls._read_any(p)
                if data.get("dataset_id") != dataset_id:
                    raise LedgerError(
                        f"{p}: ledger was opened with dataset_id={data.get('dataset_id')!r} but this work asks for "
                        f"{dataset_id!r}; a ledger accounts for one dataset"
                    )
                for key, want in (("budget_epsilon", budget_epsilon), ("delta", delta), ("accountant", accountant)):
                    if data.get(key) != want:  # in force for this handle; written with its next reservation
                        log.warning("ledger %s: %s changed from %s to %s by the node's configuration",
                                    p.name, key, data.get(key), want)
                        data[key] = want
                if migrated:  # never lose what a version-1 ledger holds
                    atomic_write_json(p, data)
            else:
                data = {
                    "version": LEDGER_VERSION,
                    "budget_epsilon": budget_epsilon,
                    "delta": delta,
                    "accountant": accountant,
                    "dataset_id": dataset_id,
                    "entries": [],
                    "studies": {},
                    "released_size": None,
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
        return cls(p, cls._read_any(p)[0])

    @staticmethod
    def _read_raw(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: privacy ledger unreadable ({exc}); refusing to train without it") from None

    @classmethod
    def _read_any(cls, path: Path) -> tuple[dict[str, Any], bool]:
        """The ledger's content (version 2), and whether it was migrated from version 1."""
        data = cls._read_raw(path)
        if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("history"), list):
            return _migrate_v1(path, data), True
        return cls._check_v2(path, data), False

    @staticmethod
    def _check_v2(path: Path, data: Any) -> dict[str, Any]:
        if (not isinstance(data, dict) or data.get("version") != LEDGER_VERSION
                or not isinstance(data.get("entries"), list) or not isinstance(data.get("studies"), dict)):
            raise LedgerError(f"{path}: not a fedrad privacy ledger (version {LEDGER_VERSION})")
        return data

    def _reload(self) -> None:
        data, migrated = self._read_any(self.path)
        if migrated:  # replaced by a version-1 file behind our back: keep what it holds, in version 2
            atomic_write_json(self.path, data)
        for key in ("budget_epsilon", "delta", "accountant"):  # this handle's settings stay in force
            data[key] = self._data[key]
        self._data = data

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
    def dataset_id(self) -> str:
        return str(self._data.get("dataset_id", ""))

    def history_in(self, account: Account = "train") -> list[HistoryEntry]:
        """Every entry of one account, in order (lifetime, over every study)."""
        _check_account(account)
        return [_triple(e) for e in self._data["entries"] if e.get("account", "train") == account]

    @property
    def history(self) -> list[HistoryEntry]:
        """The training account's lifetime history."""
        return self.history_in("train")

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"]]

    def spent(self, account: Account = "train") -> float:
        """Cumulative (lifetime) epsilon of one account, over every study."""
        return epsilon_for(history=self.history_in(account), delta=self.delta, accountant=self.accountant)

    def history_of(self, study: str, account: Account = "train") -> list[HistoryEntry]:
        """The work recorded for one study in one account (its entries, in order). The training
        account includes the dataset's size release, which every study re-sends."""
        _check_account(account)
        return [_triple(e) for e in self._data["entries"] if e.get("account", "train") == account
                and (e["study"] == study or (account == "train" and e["study"] in DATASET_RELEASES))]

    def spent_by(self, study: str, account: Account = "train", *, delta: float | None = None) -> float:
        """Epsilon of one study's own work on this dataset (at ``delta``, default the ledger's)."""
        return epsilon_for(history=self.history_of(study, account), delta=delta or self.delta,
                           accountant=self.accountant)

    def preview(self, *, noise_multiplier: float, sample_rate: float, steps: int, account: Account = "train") -> float:
        """Epsilon the account would reach after the given extra work (nothing is written)."""
        return epsilon_for(
            history=self.history_in(account) + [(noise_multiplier, sample_rate, steps)], delta=self.delta,
            accountant=self.accountant,
        )

    def study(self, key: str) -> StudyRecord | None:
        """The node's record of one study (None: never seen)."""
        rec = self._data["studies"].get(key)
        if rec is None:
            return None
        return StudyRecord(key=key, name=str(rec.get("name", "")), planned_rounds=int(rec["planned_rounds"]),
                           planned_evaluations=int(rec["planned_evaluations"]), train_rounds=int(rec["train_rounds"]),
                           evaluations=int(rec["evaluations"]), first_seen=float(rec["first_seen"]))

    @property
    def studies(self) -> list[StudyRecord]:
        return [r for r in (self.study(k) for k in self._data["studies"]) if r is not None]

    @property
    def released_size(self) -> int | None:
        """The training set's DP-released size, once released (None before)."""
        rel = self._data.get("released_size")
        return None if not rel else int(rel["value"])

    # ------------------------------------------------------------------ mutation
    def reserve(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, study: str, round: int,
        study_budget: float | None = None, account: Account = "train", study_delta: float | None = None,
        turn: StudyTurn | None = None, plan: dict[str, float | str] | None = None,
    ) -> Reservation:
        """Record the work *before* it runs; refuse it if it would exceed the dataset's lifetime
        budget or (when given) ``study_budget`` for this study's own work in this account.

        ``study_delta``: the delta at which the study's own epsilon is evaluated (the smaller of the
        study's and the node's; default the ledger's). ``turn``: count the study's round or
        evaluation in the same atomic write. ``plan``: the round's data-independent plan details
        (expected batch size, usefulness verdict), kept in the entry for the record.
        """
        _check_account(account)
        if study_budget is not None and not study_budget > 0:
            raise PrivacyError(f"study_budget must be > 0, got {study_budget!r}")
        if study_delta is not None and not 0 < study_delta < 1:
            raise PrivacyError(f"study_delta must be in (0, 1), got {study_delta!r}")
        what = "evaluation" if account == "val" else "round"
        with locked(self.path):
            self._reload()
            if turn is not None:
                self._check_turn(turn)
            before = self.spent(account)
            after = self.preview(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, account=account)
            if after > self.budget * (1 + 1e-9):
                raise BudgetExceededError(
                    f"{what} {round} would take the dataset's {account} epsilon from {before:.4g} to {after:.4g}, over "
                    f"the site's lifetime budget of {self.budget:g} (delta={self.delta:g}); {what} refused"
                )
            study_after = None
            if study_budget is not None:
                study_after = epsilon_for(history=self.history_of(study, account) + [(noise_multiplier, sample_rate, steps)],
                                          delta=study_delta or self.delta, accountant=self.accountant)
                if study_after > study_budget * (1 + 1e-9):
                    raise BudgetExceededError(
                        f"{what} {round} would take study {study[:16]}'s {account} epsilon to {study_after:.4g}, over "
                        f"the {study_budget:g} it asked for (delta={study_delta or self.delta:g}); {what} refused"
                    )
            self._data["entries"].append(
                {
                    "time": time.time(),
                    "account": account,
                    "study": study,
                    "round": int(round),
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "epsilon_before": before,
                    "epsilon_after": after,
                    **({"plan": dict(plan)} if plan else {}),
                }
            )
            if turn is not None:
                self._take_turn(turn)
            atomic_write_json(self.path, self._data)
        log.info("ledger %s: reserved %d %s steps, epsilon %.4g -> %.4g of %g", self.path.name, steps, account,
                 before, after, self.budget)
        return Reservation(before, after, self.budget, float(noise_multiplier), float(sample_rate), int(steps),
                           study_after)

    def count_turn(self, turn: StudyTurn) -> None:
        """Count a round or evaluation of a study that costs nothing (a non-DP study the policy allows)."""
        with locked(self.path):
            self._reload()
            self._check_turn(turn)
            self._take_turn(turn)
            atomic_write_json(self.path, self._data)

    def _release_once(self, *, key: str, study: str, what: str, record: dict[str, Any],
                      noise_multiplier: float) -> Reservation:
        """Charge one Gaussian release of sensitivity 1 to the training account and keep its value under
        ``key``; refused if already released (a released statistic is never re-drawn)."""
        with locked(self.path):
            self._reload()
            if self._data.get(key):
                raise LedgerError(f"{self.path}: the {what} is already released; it is never re-drawn")
            before = self.spent("train")
            after = self.preview(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
            if after > self.budget * (1 + 1e-9):
                raise BudgetExceededError(
                    f"releasing the {what} would take the dataset's epsilon from {before:.4g} to {after:.4g}, over "
                    f"the site's lifetime budget of {self.budget:g}; refused"
                )
            now = time.time()
            self._data["entries"].append({
                "time": now, "account": "train", "study": study, "round": 0,
                "noise_multiplier": float(noise_multiplier), "sample_rate": 1.0, "steps": 1,
                "epsilon_before": before, "epsilon_after": after,
            })
            self._data[key] = {**record, "noise_multiplier": float(noise_multiplier), "time": now}
            atomic_write_json(self.path, self._data)
        log.info("ledger %s: %s released once (noise multiplier %g)", self.path.name, what, noise_multiplier)
        return Reservation(before, after, self.budget, float(noise_multiplier), 1.0, 1)

    def release_size(self, *, value: int, noise_multiplier: float) -> Reservation:
        """Record the one-off release of the training set's noisy size (charged to the training
        account as one Gaussian mechanism of sensitivity 1). Refused if it is already released."""
        if not isinstance(value, int) or value < 1:
            raise PrivacyError(f"released size must be an int >= 1, got {value!r}")
        return self._release_once(key="released_size", study=SIZE_RELEASE, what="training set's noisy size",
                                  record={"value": int(value)}, noise_multiplier=noise_multiplier)

    @property
    def released_class_counts(self) -> list[int] | None:
        """The training set's DP-released per-class counts, once released (None before)."""
        rel = self._data.get("released_class_counts")
        return None if not rel else [int(v) for v in rel["values"]]

    def release_class_counts(self, *, values: list[int], noise_multiplier: float) -> Reservation:
        """Record the one-off release of the training set's noisy per-class counts (a histogram:
        adding or removing one example changes one count by 1, so L2 sensitivity 1; charged to the
        training account as one Gaussian mechanism). Refused if already released."""
        if not values or not all(isinstance(v, int) and v >= 0 for v in values):
            raise PrivacyError(f"released class counts must be ints >= 0, got {values!r}")
        return self._release_once(key="released_class_counts", study=CLASS_COUNTS_RELEASE,
                                  what="training set's noisy class counts", record={"values": [int(v) for v in values]},
                                  noise_multiplier=noise_multiplier)

    def adopt_legacy(self, *, key: str, legacy_id: str, name: str, planned_rounds: int,
                     planned_evaluations: int) -> int:
        """A ledger migrated from version 1 holds a study's rounds under the coordinator's study id
        (``fingerprint()[:16]``): on the study's first request after the upgrade, its entries are
        re-keyed to the study's content key and its record starts at the rounds already trained,
        so the upgrade gives no fresh per-study budget. Returns the rounds adopted (0: nothing to do)."""
        with locked(self.path):
            self._reload()
            if not self._data.get("migrated_from_v1") or key in self._data["studies"]:
                return 0
            matched = [e for e in self._data["entries"] if e.get("account", "train") == "train"
                       and e["study"] == legacy_id]
            if not matched:
                return 0
            for e in matched:
                e["study"], e["legacy_study"] = key, legacy_id
            rounds = min(int(planned_rounds), len({int(e["round"]) for e in matched}))
            self._data["studies"][key] = {
                "name": name, "planned_rounds": int(planned_rounds), "planned_evaluations": int(planned_evaluations),
                "train_rounds": rounds, "evaluations": 0, "first_seen": min(float(e.get("time") or time.time())
                                                                             for e in matched),
                "adopted_from_v1": legacy_id,
            }
            atomic_write_json(self.path, self._data)
        log.warning("ledger %s: study %s adopted from the version-1 ledger (%d rounds already trained)",
                    self.path.name, key[:16], rounds)
        return rounds

    def _check_turn(self, turn: StudyTurn) -> None:
        """(Lock held, freshly reloaded.) Refuse a turn the node's own record does not allow."""
        studies = self._data["studies"]
        rec = studies.get(turn.key)
        if rec is None:
            if turn.max_studies is not None and len(studies) >= turn.max_studies:
                raise PolicyViolation("max_studies", f"this dataset already served {len(studies)} distinct studies, "
                                      f"policy allows {turn.max_studies}; a new study is refused")
            done = 0
        else:
            done = int(rec["train_rounds"] if turn.kind == "train" else rec["evaluations"])
        planned = turn.planned_rounds if turn.kind == "train" else turn.planned_evaluations
        if rec is not None:
            planned = int(rec["planned_rounds"] if turn.kind == "train" else rec["planned_evaluations"])
        if done >= planned:
            raise BudgetExceededError(f"study {turn.key[:16]} has had all its {planned} {turn.kind} turns on this node; "
                                      "refused")
        if done != turn.expect_done:
            raise LedgerError(f"study {turn.key[:16]}: {turn.kind} count changed while this request was planned "
                              f"({turn.expect_done} -> {done}); refused, the coordinator may retry")

    def _take_turn(self, turn: StudyTurn) -> None:
        studies = self._data["studies"]
        rec = studies.setdefault(turn.key, {
            "name": turn.name, "planned_rounds": int(turn.planned_rounds),
            "planned_evaluations": int(turn.planned_evaluations), "train_rounds": 0, "evaluations": 0,
            "first_seen": time.time(),
        })
        rec["train_rounds" if turn.kind == "train" else "evaluations"] += 1
        rec["last_seen"] = time.time()

    def accountant_state(self) -> dict[str, Any]:
        """The Opacus accountant ``state_dict()`` equivalent of this ledger's training account."""
        return {"history": self.history, "mechanism": self.accountant}


def _check_account(account: str) -> None:
    if account not in ACCOUNTS:
        raise PrivacyError(f"unknown ledger account {account!r} (known: {list(ACCOUNTS)})")


def _triple(e: dict[str, Any]) -> HistoryEntry:
    return float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])


def _migrate_v1(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: every entry is a training entry; the history list is the authority (an
    entry without metadata keeps its triple under study ``"?"``). Nothing is dropped."""
    history = data.get("history") or []
    old = data.get("entries") or []
    entries = []
    for i, h in enumerate(history):
        meta = old[i] if i < len(old) and isinstance(old[i], dict) else {}
        sigma, q, steps = float(h[0]), float(h[1]), int(h[2])
        if meta and (float(meta.get("noise_multiplier", -1)), float(meta.get("sample_rate", -1)),
                     int(meta.get("steps", -1))) != (sigma, q, steps):
            meta = {}
        entries.append({
            "time": meta.get("time"), "account": "train", "study": str(meta.get("study", "?")),
            "round": int(meta.get("round", 0)), "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
            "epsilon_before": meta.get("epsilon_before"), "epsilon_after": meta.get("epsilon_after"),
        })
    log.warning("ledger %s: migrated from format version 1 to %d (%d training entries kept)", path.name,
                LEDGER_VERSION, len(entries))
    return {
        "version": LEDGER_VERSION,
        "budget_epsilon": data.get("budget_epsilon"),
        "delta": data.get("delta"),
        "accountant": data.get("accountant", "rdp"),
        "dataset_id": data.get("dataset_id", ""),
        "entries": entries,
        "studies": {},
        "released_size": None,
        "created": data.get("created", time.time()),
        "migrated_from_v1": time.time(),
    }
