"""Human-facing views of a study: a live rich display while it runs, tables at the end."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .history import RoundRecord, StudyHistory


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None:
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if not math.isfinite(v) else format(v, fmt)


def _eps(value: Any, budget: Any) -> str:
    return f"{_f(value, '.2f')}/{_f(budget, 'g')}" if budget is not None else _f(value, ".2f")


def site_privacy(h: dict[str, Any]) -> str:
    """A hospital's privacy in one round: this study's epsilon of its study budget, then the
    dataset's lifetime epsilon of its lifetime budget (two accounts, two budgets)."""
    study = _eps(h.get("study_epsilon"), h.get("study_epsilon_budget"))
    life = _eps(h.get("epsilon"), h.get("epsilon_budget"))
    if h.get("study_epsilon") is None:
        return f"lifetime eps {life}"
    return f"study eps {study} (lifetime {life})"


class RichReporter:
    """Progress bar over rounds plus one line per round: per-hospital privacy (this study's epsilon and
    the dataset's lifetime epsilon, each of its own budget; or why it is missing), pooled validation
    AUC and loss (from the hospitals' DP histograms), test AUC."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self.task: Any = None

    def study_started(self, *, name: str, first_round: int, total_rounds: int, hospitals: int) -> None:
        self.console.print(f"[bold]{name}[/]: {hospitals} hospitals, rounds {first_round}..{total_rounds}")
        self.progress.start()
        self.task = self.progress.add_task("round", total=total_rounds, completed=first_round - 1)

    def round_started(self, round: int) -> None:
        self.progress.update(self.task, description=f"round {round}: training")

    def round_finished(self, record: RoundRecord, history: StudyHistory) -> None:
        parts = []
        for name in sorted(record.hospitals):
            h = record.hospitals[name]
            if h.get("status", "ok") != "ok":
                parts.append(f"{name} [yellow]{h['status'].split(':')[0]}[/]")
            else:
                parts.append(f"{name} {site_privacy(h)}")
        pooled, test = record.pooled, record.global_test
        tail = f" | val AUC {_f(pooled.get('auc'))} loss {_f(pooled.get('loss'))}" if pooled else ""
        tail += f" | test AUC {_f(test.get('auc'))} loss {_f(test.get('loss'))}" if test else ""
        self.progress.console.print(f"round {record.round} ({record.seconds:.1f}s): " + "; ".join(parts) + tail)
        self.progress.advance(self.task)

    def round_validated(self, record: RoundRecord, history: StudyHistory) -> None:
        """A round's model validated late (its histograms came with the next round's train replies)."""
        pooled, test = record.pooled, record.global_test
        self.progress.console.print(f"round {record.round} validated: val AUC {_f(pooled.get('auc'))} "
                                    f"loss {_f(pooled.get('loss'))} | test AUC {_f(test.get('auc'))} "
                                    f"loss {_f(test.get('loss'))}")

    def note(self, text: str) -> None:
        """A warning for the operator, printed above the progress bar."""
        self.progress.console.print(f"[yellow]warning:[/] {text}")

    def study_finished(self, history: StudyHistory) -> None:
        self.progress.stop()


def rounds_table(history: StudyHistory) -> Table:
    """Per round: pooled validation (from DP histograms, at its chosen threshold) and the global
    model on the test split (at the same threshold)."""
    t = Table(title="per round (federation)")
    for col in ("round", "val loss (pooled)", "val AUC (pooled)", "threshold", "val sens", "val spec", "test loss",
                "test AUC", "test sens", "test spec", "sites ok"):
        t.add_column(col, justify="right")
    for n in sorted(history.rounds):
        r = history.rounds[n]
        ok = sum(1 for h in r.hospitals.values() if h.get("status", "ok") == "ok")
        p, g = r.pooled, r.global_test
        t.add_row(str(n), _f(p.get("loss")), _f(p.get("auc")), _f(p.get("threshold"), ".4g"), _f(p.get("sensitivity")),
                  _f(p.get("specificity")), _f(g.get("loss")), _f(g.get("auc")), _f(g.get("sensitivity")),
                  _f(g.get("specificity")), f"{ok}/{len(r.hospitals)}")
    return t


def _used(eps: Any, budget: Any) -> str:
    try:
        return f"{100 * float(eps) / float(budget):.0f}%" if eps is not None and budget else "-"
    except (TypeError, ValueError):
        return "-"


def privacy_table(history: StudyHistory) -> Table:
    """Per hospital: this study's epsilon (of the study budget), the dataset's lifetime epsilon over
    every study (of the lifetime budget) and the validation account, each with its own budget."""
    t = Table(title="privacy per hospital (training: this study / the dataset's lifetime; validation)")
    for col in ("hospital", "study eps", "study budget", "used", "lifetime eps", "lifetime budget", "used",
                "val eps", "val budget", "last round", "status"):
        t.add_column(col, justify="right")
    last = history.rounds[max(history.rounds)] if history.rounds else None
    for name, p in sorted(history.privacy().items()):
        status = last.hospitals.get(name, {}).get("status", "-") if last else "-"
        t.add_row(name, _f(p.get("study_epsilon"), ".3f"), _f(p.get("study_budget"), "g"),
                  _used(p.get("study_epsilon"), p.get("study_budget")), _f(p.get("epsilon"), ".3f"),
                  _f(p.get("budget"), "g"), _used(p.get("epsilon"), p.get("budget")), _f(p.get("val_epsilon"), ".3f"),
                  _f(p.get("val_budget"), "g"), str(p["round"]), status[:60])
    return t


def final_table(history: StudyHistory) -> Table:
    """The final model (``model.pt``) on the test split, at the operating threshold chosen on pooled
    validation."""
    choice = history.model_choice or {}
    which = f" (model.pt: {choice['is']} model, round {choice['round']})" if choice.get("is") else ""
    t = Table(title=f"global model on the held-out test split{which}")
    for col in ("AUC", "threshold", "sensitivity", "specificity", "accuracy", "F1", "images"):
        t.add_column(col, justify="right")
    g = history.final_test
    thr = (history.operating_threshold or {}).get("value", g.get("threshold"))
    t.add_row(_f(g.get("auc")), _f(thr, ".4g") if thr is not None else "argmax", _f(g.get("sensitivity")),
              _f(g.get("specificity")), _f(g.get("accuracy")), _f(g.get("f1")), str(g.get("num_examples", "-")))
    return t
