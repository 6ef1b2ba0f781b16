"""Plots of a study: loss curves per round, privacy spent per hospital and the global model's
metrics (PNG).

Curves a reader must tell apart get distinct markers and line styles and a small sideways offset
per hospital (the x positions are rounds; the offset never moves a point past a quarter round), and
a curve that coincides with another says so in its legend entry. Every axis is labelled."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .history import StudyHistory  # noqa: E402


def _series(history: StudyHistory, field: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for n in sorted(history.rounds):
        for name, h in history.rounds[n].hospitals.items():
            v = h.get(field)
            if v is not None and math.isfinite(float(v)):
                xs, ys = out.setdefault(name, ([], []))
                xs.append(n)
                ys.append(float(v))
    return out


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
#: Sideways offset between hospitals' curves (in rounds), so coinciding points stay visible.
OFFSET = 0.06


def _groups(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[list[str], list[int], list[float]]]:
    """Series grouped by identical points: [(names, xs, ys)], names sorted, groups in name order."""
    groups: dict[tuple[tuple[int, ...], tuple[float, ...]], list[str]] = {}
    for name, (xs, ys) in sorted(series.items()):
        key = (tuple(xs), tuple(round(y, 9) for y in ys))
        groups.setdefault(key, []).append(name)
    return [(names, list(k[0]), list(k[1])) for k, names in groups.items()]


def plot_sites(ax: plt.Axes, series: dict[str, tuple[list[int], list[float]]], *, start_at_zero: bool = False,
               **style: object) -> int:
    """One curve per series (hospital), each with its own marker, line style, sideways offset and
    legend entry; returns the number of curves drawn. A curve with the same values as an earlier
    one every round is labelled "name (= first, curves coincide)"."""
    n = len(series)
    step = min(OFFSET, 0.5 / max(n - 1, 1))  # all offsets within +-0.25 rounds
    i = 0
    for names, xs, ys in _groups(series):
        for j, name in enumerate(names):
            shift = (i - (n - 1) / 2) * step if n > 1 else 0.0
            px = ([0] if start_at_zero else []) + xs
            py = ([0.0] if start_at_zero else []) + ys
            label = name if j == 0 else f"{name} (= {names[0]}, curves coincide)"
            ax.plot([x + shift for x in px], py, marker=MARKERS[i % len(MARKERS)],
                    ls=LINESTYLES[i % len(LINESTYLES)], markersize=7 if j == 0 else 5,
                    markerfacecolor="none" if j else None, label=label, **style)  # type: ignore[arg-type]
            i += 1
    return i


def _style(fig: plt.Figure) -> plt.Figure:
    """Integer round ticks, a grid and a legend where there is something to label."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def losses_figure(history: StudyHistory) -> plt.Figure:
    """Validation loss per round: per hospital (thin) and pooled (bold), both approximated from the
    hospitals' DP histograms, and the global model's exact loss on the coordinator's test split.
    Hospitals report no training loss (it would leave unprotected)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = sorted(history.rounds)
    plot_sites(ax, _series(history, "val_loss"), lw=1, alpha=0.7)
    for src, label, style in (("pooled", "pooled validation (from DP histograms)", "k-"),
                              ("global_test", "global model, test split", "k--")):
        pts = [(n, getattr(history.rounds[n], src).get("loss")) for n in rounds]
        pts = [(n, float(v)) for n, v in pts if v is not None and math.isfinite(float(v))]
        if pts:
            ax.plot([n for n, _ in pts], [v for _, v in pts], style, lw=2.5, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"{history.study.get('federation', {}).get('name', 'study')}: loss per round")
    return _style(fig)


#: epsilon.png panels: (site field, budget field, title). Each account has its own budget.
PRIVACY_PANELS = (
    ("study_epsilon", "study_epsilon_budget", "this study"),
    ("epsilon", "epsilon_budget", "dataset lifetime (all studies)"),
    ("val_epsilon", "val_epsilon_budget", "validation account"),
)


def _budgets(history: StudyHistory, field: str) -> list[float]:
    vals = {float(h[field]) for r in history.rounds.values() for h in r.hospitals.values()
            if h.get(field) is not None and math.isfinite(float(h[field]))}
    return sorted(vals)


def privacy_figure(history: StudyHistory) -> plt.Figure:
    """Epsilon per hospital per round, one panel per account (this study's, the dataset's lifetime,
    the validation account) with that account's budget drawn in its own panel."""
    panels = [(f, b, t) for f, b, t in PRIVACY_PANELS if _series(history, f)] or [PRIVACY_PANELS[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (field, budget_field, title) in zip(axes[0], panels):
        plot_sites(ax, _series(history, field), start_at_zero=True)  # nothing is spent before round 1
        for b in _budgets(history, budget_field):
            ax.axhline(b, color="red", ls="--", lw=1, label=f"budget epsilon={b:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative epsilon")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
    delta = history.study.get("privacy", {}).get("delta")
    fig.suptitle(f"privacy spent (delta={delta:g})" if delta else "privacy spent")
    return _style(fig)


def metrics_figure(history: StudyHistory) -> plt.Figure:
    """AUC, sensitivity and specificity of the global model per round (pooled validation at its
    chosen threshold; test split at the same threshold)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = sorted(history.rounds)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for src, label in (("pooled", "pooled validation"), ("global_test", "test split")):
        for metric in ("auc", "sensitivity", "specificity"):
            pts = [(n, getattr(history.rounds[n], src).get(metric)) for n in rounds]
            pts = [(n, float(v)) for n, v in pts if v is not None and math.isfinite(float(v))]
            if pts:
                series[f"{metric} ({label})"] = ([n for n, _ in pts], [v for _, v in pts])
    plot_sites(ax, series)
    choice = history.model_choice or {}
    if choice.get("round"):
        ax.axvline(choice["round"], color="grey", ls=":", lw=1, label=f"model.pt ({choice.get('is')}, "
                   f"round {choice['round']})")
    ax.set_xlabel("round")
    ax.set_ylabel("value (0-1; at the pooled validation threshold)")
    ax.set_ylim(0, 1.02)
    ax.set_title("global model")
    return _style(fig)


def plot_losses(history: StudyHistory, path: Path) -> Path:
    return _save(losses_figure(history), path)


def plot_privacy(history: StudyHistory, path: Path) -> Path:
    return _save(privacy_figure(history), path)


def plot_metrics(history: StudyHistory, path: Path) -> Path:
    return _save(metrics_figure(history), path)


def write_plots(history: StudyHistory, run_dir: Path) -> list[Path]:
    return [
        plot_losses(history, run_dir / "loss.png"),
        plot_privacy(history, run_dir / "epsilon.png"),
        plot_metrics(history, run_dir / "metrics.png"),
    ]
