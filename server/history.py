"""What happened in a study, round by round and hospital by hospital; written as metrics.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.common.durable import atomic_write_json
from fedrad.common.metrics import pooled_summary

#: Per-hospital fields reported for every round (see README "Outputs").
SITE_FIELDS = ("train_loss", "val_loss", "auc", "accuracy", "sensitivity", "specificity", "f1", "epsilon",
               "epsilon_budget", "noise_multiplier", "num_examples", "train_seconds")


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

    def site(self, name: str) -> dict[str, Any]:
        return self.hospitals.setdefault(name, {"status": "ok"})

    def mean_train_loss(self) -> float:
        vals = [(h["train_loss"], h.get("num_examples") or 1) for h in self.hospitals.values() if h.get("train_loss") is not None]
        return float(np.average([v for v, _ in vals], weights=[w for _, w in vals])) if vals else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregated": self.aggregated,
            "seconds": self.seconds,
            "hospitals": self.hospitals,
            "pooled_validation": self.pooled,
            "global_test": self.global_test,
            "train_loss": self.mean_train_loss(),
        }


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

    @classmethod
    def resume(cls, path: Path, *, study: dict[str, Any], study_id: str, up_to_round: int) -> "StudyHistory":
        hist = cls(path, study=study, study_id=study_id)
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            hist.initial_test = data.get("initial_test") or {}
            hist.events = list(data.get("events", []))
            for r in data.get("rounds", []):
                if r["round"] <= up_to_round:
                    hist.rounds[r["round"]] = RoundRecord(
                        round=r["round"], hospitals=r.get("hospitals", {}), pooled=r.get("pooled_validation", {}),
                        global_test=r.get("global_test", {}), aggregated=r.get("aggregated", False),
                        seconds=r.get("seconds", 0.0),
                    )
        return hist

    def round(self, n: int) -> RoundRecord:
        return self.rounds.setdefault(n, RoundRecord(round=n))

    def pool_validation(self, n: int, confusions: list[np.ndarray], histograms: list[np.ndarray]) -> None:
        if confusions:
            s = pooled_summary(confusions, histograms)
            self.round(n).pooled = {**s.as_dict(), "num_examples": int(sum(int(c.sum()) for c in confusions))}

    def privacy(self) -> dict[str, dict[str, Any]]:
        """Latest epsilon per hospital (cumulative, as its ledger reports it)."""
        out: dict[str, dict[str, Any]] = {}
        for n in sorted(self.rounds):
            for name, h in self.rounds[n].hospitals.items():
                if h.get("epsilon") is not None:
                    out[name] = {"epsilon": h["epsilon"], "budget": h.get("epsilon_budget"), "round": n}
        return out

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
            "events": self.events,
        }

    def save(self) -> None:
        write_json_atomic(self.path, self.as_dict())
