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


class RichReporter:
    """Progress bar over rounds plus one line per round: per-hospital loss and epsilon."""

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
                parts.append(f"{name} loss {_f(h.get('train_loss'))} eps {_f(h.get('epsilon'), '.2f')}")
        test = record.global_test
        tail = f" | test AUC {_f(test.get('auc'))} acc {_f(test.get('accuracy'))}" if test else ""
        self.progress.console.print(f"round {record.round} ({record.seconds:.1f}s): " + "; ".join(parts) + tail)
        self.progress.advance(self.task)

    def study_finished(self, history: StudyHistory) -> None:
        self.progress.stop()


def rounds_table(history: StudyHistory) -> Table:
    t = Table(title="per round (federation)")
    for col in ("round", "train loss", "val loss (pooled)", "val AUC (pooled)", "val acc (pooled)", "test loss",
                "test AUC", "test acc", "sites ok"):
        t.add_column(col, justify="right")
    for n in sorted(history.rounds):
        r = history.rounds[n]
        vals = [h.get("val_loss") for h in r.hospitals.values() if h.get("val_loss") is not None]
        weights = [h.get("val_examples", 1) for h in r.hospitals.values() if h.get("val_loss") is not None]
        val_loss = sum(v * w for v, w in zip(vals, weights)) / sum(weights) if vals else None
        ok = sum(1 for h in r.hospitals.values() if h.get("status", "ok") == "ok")
        t.add_row(str(n), _f(r.mean_train_loss()), _f(val_loss), _f(r.pooled.get("auc")), _f(r.pooled.get("accuracy")),
                  _f(r.global_test.get("loss")), _f(r.global_test.get("auc")), _f(r.global_test.get("accuracy")),
                  f"{ok}/{len(r.hospitals)}")
    return t


def privacy_table(history: StudyHistory) -> Table:
    t = Table(title="privacy per hospital")
    for col in ("hospital", "epsilon spent", "budget", "used", "last round", "status"):
        t.add_column(col, justify="right")
    last = history.rounds[max(history.rounds)] if history.rounds else None
    for name, p in sorted(history.privacy().items()):
        used = f"{100 * p['epsilon'] / p['budget']:.0f}%" if p.get("budget") else "-"
        status = last.hospitals.get(name, {}).get("status", "-") if last else "-"
        t.add_row(name, _f(p["epsilon"], ".3f"), _f(p.get("budget"), "g"), used, str(p["round"]), status[:60])
    return t


def final_table(history: StudyHistory) -> Table:
    t = Table(title="global model on the held-out test split")
    for col in ("AUC", "accuracy", "sensitivity", "specificity", "F1", "images"):
        t.add_column(col, justify="right")
    g = history.final_test
    t.add_row(_f(g.get("auc")), _f(g.get("accuracy")), _f(g.get("sensitivity")), _f(g.get("specificity")),
              _f(g.get("f1")), str(g.get("num_examples", "-")))
    return t
