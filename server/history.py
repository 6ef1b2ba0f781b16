"""What happened in a study, round by round and hospital by hospital; written as metrics.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.common.auc_noise import auc_standard_error, pooled_noise_std
from fedrad.common.durable import atomic_write_json
from fedrad.common.metrics import (
    at_threshold,
    loss_from_histograms,
    macro_auc_from_histograms,
    num_examples_from_histograms,
    pool_histograms,
    summarise_histograms,
)

from .stop_request import check_not_stopped, guarded_run, metrics_lock

#: Per-hospital fields reported for every round (see README "Outputs"). Training figures come from
#: the hospital's train reply; every validation figure is computed here from its DP histograms
#: (accuracy at the pooled threshold, None when C > 2). ``val_epsilon`` is the validation account.
SITE_FIELDS = ("num_examples", "epsilon", "epsilon_budget", "study_epsilon", "study_epsilon_budget",
               "noise_multiplier", "sample_rate", "steps", "val_examples", "val_loss", "auc", "sensitivity",
               "specificity", "accuracy", "val_epsilon", "receipts")
#: Validation figures kept per site and pooled.
VAL_FIELDS = ("auc", "loss", "sensitivity", "specificity", "accuracy", "f1")


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` (NaN/inf as null) atomically; readable by everyone who may read the run folder."""
    atomic_write_json(path, _clean(data), mode=0o644, allow_nan=False, sort_keys=False)


@dataclass
class RoundRecord:
    round: int
    hospitals: dict[str, dict[str, Any]] = field(default_factory=dict)
    pooled: dict[str, Any] = field(default_factory=dict)
    global_test: dict[str, Any] = field(default_factory=dict)
    aggregated: bool = False
    seconds: float = 0.0
    #: Where the coordinator's time in this round went (seconds): configure, screen, book_validation,
    #: aggregate, checkpoint, test_and_best. The rest of ``seconds`` is waiting for the hospitals.
    timings: dict[str, float] = field(default_factory=dict)

    def site(self, name: str) -> dict[str, Any]:
        return self.hospitals.setdefault(name, {"status": "ok"})

    def record_receipt(self, name: str, kind: str, receipt: dict[str, Any]) -> None:
        """Keep a reply's receipt (the node's audit-log head after recording it) under ``kind``."""
        self.site(name).setdefault("receipts", {})[kind] = dict(receipt)

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregated": self.aggregated,
            "seconds": self.seconds,
            "hospitals": self.hospitals,
            "pooled_validation": self.pooled,
            "global_test": self.global_test,
            "coordinator_seconds": self.timings,
        }


def _auc_se(summed: np.ndarray, pooled_std: float) -> float | None:
    """The pooled AUC's standard error; None if it cannot be had (never fails a round's booking)."""
    try:
        return auc_standard_error(summed, noise_std=pooled_std)
    except (ValueError, FloatingPointError, OverflowError):
        return None


class StudyHistory:
    """Collects per-round, per-hospital results and keeps ``metrics.json`` current."""

    def __init__(self, path: Path, *, study: dict[str, Any], study_id: str) -> None:
        self.path = path
        self.study = study
        self.study_id = study_id
        self.rounds: dict[int, RoundRecord] = {}
        self.initial_test: dict[str, Any] = {}
        self.final_test: dict[str, Any] = {}
        self.status = "running"
        self.events: list[str] = []
        #: The final model's operating threshold: {"value", "round", "rule"} (set when the study ends).
        self.operating_threshold: dict[str, Any] = {}
        #: Which global model ``model.pt`` is ({"is": "best"|"last", "round", ...}; set when the study ends).
        self.model_choice: dict[str, Any] = {}

    @classmethod
    def resume(cls, path: Path, *, study: dict[str, Any], study_id: str, up_to_round: int) -> "StudyHistory":
        hist = cls(path, study=study, study_id=study_id)
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            hist.initial_test = data.get("initial_test") or {}
            hist.events = list(data.get("events", []))
            hist.operating_threshold = data.get("operating_threshold") or {}
            hist.model_choice = data.get("model") or {}
            for r in data.get("rounds", []):
                if r["round"] <= up_to_round:
                    hist.rounds[r["round"]] = RoundRecord(
                        round=r["round"], hospitals=r.get("hospitals", {}), pooled=r.get("pooled_validation", {}),
                        global_test=r.get("global_test", {}), aggregated=r.get("aggregated", False),
                        seconds=r.get("seconds", 0.0), timings=dict(r.get("coordinator_seconds") or {}),
                    )
        return hist

    def round(self, n: int) -> RoundRecord:
        return self.rounds.setdefault(n, RoundRecord(round=n))

    def pool_validation(self, n: int, histograms: dict[str, np.ndarray], *,
                        noise_std: dict[str, float | None] | None = None,
                        target_sensitivity: float | None = None) -> None:
        """Round ``n``'s validation figures from the sites' (DP) histograms: pooled from their sum,
        with the operating threshold chosen there; per site at that pooled threshold.

        ``noise_std``: per site, the per-count noise std its reply stated (``histogram-noise-std``);
        with it the pooled AUC gets its standard error (``auc_se``, :mod:`fedrad.common.auc_noise`),
        which the model choice weighs (:mod:`fedrad.server.best_model`)."""
        if not histograms:
            return
        summed = pool_histograms(list(histograms.values()))
        pooled = summarise_histograms(summed, target_sensitivity=target_sensitivity)
        stds = [(noise_std or {}).get(name) for name in histograms]
        pooled_std = pooled_noise_std(stds) if all(s is not None for s in stds) else None
        rec = self.round(n)
        rec.pooled = {**{k: getattr(pooled, k) for k in VAL_FIELDS}, "threshold": pooled.threshold,
                      "confusion": pooled.confusion, "num_examples": pooled.num_examples, "sites": len(histograms),
                      "rule": "youden" if target_sensitivity is None else f"sensitivity>={target_sensitivity:g}",
                      # None: some site did not state its noise (an older node); the choice then compares plainly
                      "noise_std": pooled_std,
                      "auc_se": (_auc_se(summed, pooled_std)
                                 if pooled_std is not None and math.isfinite(pooled.auc) else None)}
        for name, hist in histograms.items():
            rates = at_threshold(hist, pooled.threshold)
            rec.site(name).update({
                "val_examples": num_examples_from_histograms(hist), "val_loss": loss_from_histograms(hist),
                "auc": macro_auc_from_histograms(hist), **{k: rates[k] for k in ("sensitivity", "specificity",
                                                                                  "accuracy", "f1")}})

    def latest_threshold(self, up_to: int | None = None) -> tuple[int, float] | None:
        """(round, threshold) of the latest round (<= ``up_to``) whose pooled validation chose one."""
        for n in sorted(self.rounds, reverse=True):
            if up_to is not None and n > up_to:
                continue
            t = self.rounds[n].pooled.get("threshold")
            if t is not None:
                return n, float(t)
        return None

    def last_receipts(self) -> dict[str, dict[str, Any]]:
        """Per hospital, its latest receipt (highest audit count), with the round and reply kind."""
        out: dict[str, dict[str, Any]] = {}
        for n in sorted(self.rounds):
            for name, h in self.rounds[n].hospitals.items():
                for kind, r in (h.get("receipts") or {}).items():
                    if name not in out or int(r["audit_count"]) >= int(out[name]["audit_count"]):
                        out[name] = {**r, "round": n, "kind": kind}
        return out

    def privacy(self) -> dict[str, dict[str, Any]]:
        """Per hospital, its latest privacy figures, each with its own budget:

        * ``study_epsilon`` / ``study_budget``: spent by this study (the hospital's per-study account);
        * ``epsilon`` / ``budget``: the dataset's lifetime spend over every study (its ledger), which is
          what the hospital's ledger refuses on;
        * ``val_epsilon`` / ``val_budget``: the validation account (evaluate replies).
        """
        out: dict[str, dict[str, Any]] = {}
        for n in sorted(self.rounds):
            for name, h in self.rounds[n].hospitals.items():
                rec = out.setdefault(name, {"epsilon": None, "budget": None, "study_epsilon": None,
                                            "study_budget": None, "val_epsilon": None, "val_budget": None,
                                            "round": None})
                if h.get("epsilon") is not None:
                    rec.update(epsilon=h["epsilon"], budget=h.get("epsilon_budget"), round=n)
                if h.get("study_epsilon") is not None:
                    rec.update(study_epsilon=h["study_epsilon"], study_budget=h.get("study_epsilon_budget"), round=n)
                if h.get("val_epsilon") is not None:
                    rec.update(val_epsilon=h["val_epsilon"], val_budget=h.get("val_epsilon_budget"))
        return {k: v for k, v in out.items() if v["epsilon"] is not None}

    def event(self, text: str) -> None:
        self.events.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "status": self.status,
            "study": self.study,
            "initial_test": self.initial_test,
            "rounds": [self.rounds[n].as_dict() for n in sorted(self.rounds)],
            "global_test": self.final_test,
            "privacy": self.privacy(),
            "operating_threshold": self.operating_threshold,
            "model": self.model_choice,
            "events": self.events,
        }

    def check_stop(self) -> None:
        """In a ServerApp guarding its run: raise :class:`~fedrad.server.stop_request.RunStopRequested`
        once ``fedrad stop`` asked (called before writing a checkpoint, so that no round is
        checkpointed that ``metrics.json`` will not record)."""
        run_dir = self.path.parent
        run_id = guarded_run(run_dir)
        if run_id is not None:
            check_not_stopped(run_dir, run_id=run_id)

    def save(self, *, lock_held: bool = False) -> None:
        """Write ``metrics.json``; in a ServerApp guarding its run, only while no stop is requested
        (raises :class:`~fedrad.server.stop_request.RunStopRequested` once ``fedrad stop`` asked).

        ``lock_held``: the caller holds the run's metrics lock and has decided to write (``fedrad
        stop`` marking the run): written as it is (taking the lock again would wait on itself when
        the ServerApp's guard is registered in the same process, as in tests)."""
        run_dir = self.path.parent
        run_id = guarded_run(run_dir)
        if run_id is None or lock_held:
            write_json_atomic(self.path, self.as_dict())
            return
        with metrics_lock(run_dir):
            check_not_stopped(run_dir, run_id=run_id)
            write_json_atomic(self.path, self.as_dict())
