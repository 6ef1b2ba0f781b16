"""Plots of a study: loss curves per round, privacy spent per hospital and the global model's
metrics (PNG)."""

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


def _finish(fig: plt.Figure, axes: list[plt.Axes], path: Path) -> Path:
    """Integer round ticks, a grid and a legend where there is something to label; save and close."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(history: StudyHistory, path: Path) -> Path:
    """Validation loss per round: per hospital (thin) and pooled (bold), both approximated from the
    hospitals' DP histograms, and the global model's exact loss on the coordinator's test split.
    Hospitals report no training loss (it would leave unprotected)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = sorted(history.rounds)
    for name, (xs, ys) in sorted(_series(history, "val_loss").items()):
        ax.plot(xs, ys, marker="o", lw=1, alpha=0.5, label=name)
    for src, label, style in (("pooled", "pooled validation (from DP histograms)", "k-"),
                              ("global_test", "global model, test split", "k--")):
        pts = [(n, getattr(history.rounds[n], src).get("loss")) for n in rounds]
        pts = [(n, float(v)) for n, v in pts if v is not None and math.isfinite(float(v))]
        if pts:
            ax.plot([n for n, _ in pts], [v for _, v in pts], style, lw=2.5, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"{history.study.get('federation', {}).get('name', 'study')}: loss per round")
    return _finish(fig, [ax], path)


def plot_privacy(history: StudyHistory, path: Path) -> Path:
    """Cumulative epsilon per hospital per round, with each hospital's budget."""
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = set()
    for name, (xs, ys) in sorted(_series(history, "epsilon").items()):
        ax.plot([0] + xs, [0.0] + ys, marker="o", label=name)  # nothing is spent before round 1
    for h in history.privacy().values():
        if h.get("budget") is not None:
            budgets.add(float(h["budget"]))
    for b in sorted(budgets):
        ax.axhline(b, color="red", ls="--", lw=1, label=f"budget epsilon={b:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_ylim(bottom=0)
    delta = history.study.get("privacy", {}).get("delta")
    ax.set_title(f"privacy spent (delta={delta:g})" if delta else "privacy spent")
    return _finish(fig, [ax], path)


def plot_metrics(history: StudyHistory, path: Path) -> Path:
    """AUC, sensitivity and specificity of the global model per round (pooled validation at its
    chosen threshold; test split at the same threshold)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = sorted(history.rounds)
    for src, label, style in (("pooled", "pooled validation", "-"), ("global_test", "test split", "--")):
        for metric in ("auc", "sensitivity", "specificity"):
            pts = [(n, getattr(history.rounds[n], src).get(metric)) for n in rounds]
            pts = [(n, v) for n, v in pts if v is not None and math.isfinite(float(v))]
            if pts:
                ax.plot([n for n, _ in pts], [v for _, v in pts], style, marker="o", label=f"{metric} ({label})")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title("global model")
    return _finish(fig, [ax], path)


def write_plots(history: StudyHistory, run_dir: Path) -> list[Path]:
    return [
        plot_losses(history, run_dir / "loss.png"),
        plot_privacy(history, run_dir / "epsilon.png"),
        plot_metrics(history, run_dir / "metrics.png"),
    ]
