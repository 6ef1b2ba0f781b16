"""Which global model a study hands over, and warnings about rounds that train with far more noise.

A study keeps three model files in its run folder:

* ``best-model.pt``: the global model of the round with the best *pooled validation* (macro AUC
  computed from the hospitals' DP score histograms; ties broken by the lower pooled loss). It is
  written as the study goes, so a crash never loses it.
* ``last-model.pt``: the global model after the last round.
* ``model.pt``: the model the study hands over. The last one, unless an earlier round's pooled
  validation beats the last round's by more than the validation's own noise can explain
  (:data:`Z_CHOICE` standard errors of the difference, :mod:`fedrad.common.auc_noise`), or the last
  round trained with far more noise than before (:func:`noise_warning`), or the last round has no
  usable pooled validation: then the best one (a copy of ``best-model.pt``). ``metrics.json``
  (``model``) and the console say which, from which round, and why.

Why not simply the best: at the default budgets the pooled validation of many small sites is
mostly noise (20 sites at epsilon 8: pooled AUC 0.51-0.72 round to round while the models' test AUC
rose from 0.70 to 0.92), and "the best" was a lucky draw of round 4 (test AUC 0.896 against the last
model's 0.924). Training more rounds is what DP-SGD budgets pay for; an earlier model has to earn
its place by a difference the noise cannot explain.

Choosing by pooled validation is post-processing of DP-released histograms (no privacy cost) and
never looks at the coordinator's test split. It matters after a resume: a round re-run after a
crash may be trained with far more noise (the hospitals' budgets were already charged for the
interrupted round), and the last model can then be much worse than an earlier one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedrad.common.auc_noise import beats_beyond_noise, noise_margin

from .checkpoints import load_checkpoint, save_checkpoint
from .history import StudyHistory

log = logging.getLogger(__name__)

MODEL = "model.pt"
BEST_MODEL = "best-model.pt"
LAST_MODEL = "last-model.pt"
#: A round whose noise multiplier exceeds this many times the median of earlier rounds is flagged.
NOISE_JUMP = 1.5
#: Standard errors of the difference by which an earlier round's pooled AUC must beat the last round's.
Z_CHOICE = 2.0
SELECTED_BY = ("the last model, unless an earlier round's pooled validation AUC (from the hospitals' DP "
               f"histograms; ties by pooled loss) beats it by more than {Z_CHOICE:g} standard errors of the "
               "difference, or the last round trained with far more noise")


def pooled_score(pooled: dict[str, Any]) -> tuple[float, float] | None:
    """(AUC, -loss) of a round's pooled validation (higher is better); None without a finite AUC."""
    auc = pooled.get("auc") if pooled else None
    if auc is None or not math.isfinite(float(auc)):
        return None
    loss = pooled.get("loss")
    neg_loss = -float(loss) if loss is not None and math.isfinite(float(loss)) else -math.inf
    return float(auc), neg_loss


def best_round(history: StudyHistory) -> int | None:
    """The round whose pooled validation is best (the earliest among equals); None if none has one."""
    best: tuple[tuple[float, float], int] | None = None
    for n in sorted(history.rounds):
        score = pooled_score(history.rounds[n].pooled)
        if score is not None and (best is None or score > best[0]):
            best = (score, n)
    return best[1] if best else None


@dataclass
class BestModel:
    """Keeps ``best-model.pt`` current while a study runs."""

    path: Path
    round: int | None = None
    score: tuple[float, float] | None = None

    @classmethod
    def resume(cls, path: Path, *, history: StudyHistory) -> "BestModel":
        """Pick up ``path`` if it holds the best of the rounds ``history`` kept (else it is redone)."""
        best = cls(path)
        n = best_round(history)
        if n is not None and path.is_file():
            try:
                saved = int(load_checkpoint(path).get("round", -1))
            except Exception:  # noqa: BLE001 - an unreadable file is simply rewritten later
                saved = -1
            if saved == n:
                best.round, best.score = n, pooled_score(history.rounds[n].pooled)
        return best

    def offer(self, n: int, pooled: dict[str, Any], *, state_dict: dict[str, torch.Tensor], study: dict[str, Any],
              class_names: list[str], extra: dict[str, Any] | None = None) -> bool:
        """Save round ``n``'s model as the best if its pooled validation beats the best so far."""
        score = pooled_score(pooled)
        if score is None or (self.score is not None and score <= self.score):
            return False
        save_checkpoint(self.path, state_dict=state_dict, study=study, round=n, class_names=class_names,
                        extra={"pooled_validation": {"auc": score[0], "loss": -score[1]}, **(extra or {})})
        self.round, self.score = n, score
        return True


def _round_model(run_dir: Path, n: int) -> tuple[Path, dict[str, Any]] | None:
    """Where round ``n``'s weights are kept: ``best-model.pt`` or else round ``n``'s checkpoint
    (path and loaded checkpoint); None when neither holds round ``n``."""
    for path in (run_dir / BEST_MODEL, run_dir / "checkpoints" / f"round-{n:04d}.pt"):
        if path.is_file():
            ckpt = load_checkpoint(path)
            if int(ckpt.get("round", -1)) == n:
                return path, ckpt
    return None


def _kept_best(run_dir: Path, n: int) -> str | None:
    """``best-model.pt``'s name once it holds round ``n``'s model (copied from round ``n``'s checkpoint
    when it holds another round, e.g. after a resume), else None (round ``n``'s weights are gone)."""
    try:
        found = _round_model(run_dir, n)
    except Exception:  # noqa: BLE001 - an unreadable file is no kept model
        return None
    if found is None:
        return None
    path = run_dir / BEST_MODEL
    if found[0] != path:
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(found[0], tmp)
        os.replace(tmp, path)
    return BEST_MODEL


def _noisier_last_round(history: StudyHistory, last_round: int) -> bool:
    """Whether some hospital's update in ``last_round`` carried far more noise than before."""
    rec = history.rounds.get(last_round)
    return rec is not None and any(noise_warning(history, last_round, name) for name in rec.hospitals)


def choose_final(history: StudyHistory, run_dir: Path, *, last_state: dict[str, torch.Tensor],
                 last_round: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights ``model.pt`` gets and the record of the choice (``metrics.json`` ``model``).

    The best round's weights come from ``best-model.pt`` or, failing that, from its checkpoint."""
    n = best_round(history)
    choice: dict[str, Any] = {"file": MODEL, "selected_by": SELECTED_BY, "last_round": last_round, "best_round": n,
                              "best_file": None, "last_file": LAST_MODEL}
    last_pooled = history.rounds[last_round].pooled if last_round in history.rounds else {}
    last_score = pooled_score(last_pooled)
    if n is not None and n != last_round and last_score is not None and not _noisier_last_round(history, last_round):
        best_pooled = history.rounds[n].pooled
        se_best, se_last = best_pooled.get("auc_se"), last_pooled.get("auc_se")
        best_auc = pooled_score(best_pooled)[0]  # type: ignore[index]
        if not beats_beyond_noise(best_auc, last_score[0], se_better=se_best, se_worse=se_last, z=Z_CHOICE):
            margin = noise_margin(se_best, se_last, z=Z_CHOICE)
            kept = _kept_best(run_dir, n)
            choice.update({"is": "last", "round": last_round, "best_file": kept,
                           "note": (f"the last global model (round {last_round}); round {n}'s pooled validation AUC "
                                    f"{best_auc:.3f} against {last_score[0]:.3f} is within the validation's noise "
                                    f"(difference {best_auc - last_score[0]:.3f} <= {margin:.3f}, {Z_CHOICE:g} "
                                    "standard errors); the best by pooled validation is "
                                    + (f"kept as {BEST_MODEL}" if kept else "not kept (its weights are gone)"))})
            return last_state, choice
    found = _round_model(run_dir, n) if n is not None else None
    state: dict[str, torch.Tensor] | None = found[1]["state_dict"] if found else None
    if n is None or state is None or n == last_round:
        why = ("it is also the best by pooled validation" if n == last_round and n is not None
               else "no round had a usable pooled validation" if n is None
               else f"the best round's ({n}) weights were not kept")
        choice.update({"is": "last", "round": last_round,
                       "note": f"the last global model (round {last_round}); {why}"})
        if n == last_round:
            choice["best_file"] = BEST_MODEL
        return last_state, choice
    score = pooled_score(history.rounds[n].pooled)
    vs = f" vs {last_score[0]:.3f} in the last round ({last_round})" if last_score else ""
    auc = f" (AUC {score[0]:.3f}{vs})" if score else ""
    choice.update({"is": "best", "round": n, "best_file": BEST_MODEL,
                   "note": f"the best global model by pooled validation: round {n}{auc}; the last one is {LAST_MODEL}"})
    return state, choice


def noise_warning(history: StudyHistory, n: int, name: str) -> str | None:
    """A warning if ``name``'s noise multiplier in round ``n`` is more than :data:`NOISE_JUMP` times the
    median of its earlier rounds (all hospitals' earlier rounds when it has none)."""
    now = history.rounds.get(n, None)
    sigma = (now.hospitals.get(name, {}) if now else {}).get("noise_multiplier")
    if sigma is None or not math.isfinite(float(sigma)):
        return None
    own, everyone = [], []
    for r in sorted(history.rounds):
        if r >= n:
            continue
        for site, h in history.rounds[r].hospitals.items():
            v = h.get("noise_multiplier")
            if v is not None and math.isfinite(float(v)) and float(v) > 0:
                everyone.append(float(v))
                if site == name:
                    own.append(float(v))
    earlier = own or everyone
    if not earlier:
        return None
    median = statistics.median(earlier)
    whose = "its" if own else "the study's"
    if float(sigma) <= NOISE_JUMP * median:
        return None
    return (f"round {n}: {name} trained with noise multiplier {float(sigma):.3g}, {float(sigma) / median:.1f}x the "
            f"median of {whose} earlier rounds ({median:.3g}); this round's update is much "
            "noisier (little budget left, e.g. after an interrupted round was charged); model.pt is chosen by "
            "pooled validation")
