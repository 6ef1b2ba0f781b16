"""Plots and tables a reader can trust: two privacy accounts with their own budgets, coinciding
curves that stay visible and say so, labelled axes (issue 11, parts 5 and 6)."""

from __future__ import annotations

from pathlib import Path

from fedrad.server.history import StudyHistory
from fedrad.server.plots import losses_figure, metrics_figure, privacy_figure, write_plots
from fedrad.server.report import privacy_table, site_privacy


def _history(tmp_path: Path) -> StudyHistory:
    """Three hospitals with identical privacy curves (same data size and plan), two accounts."""
    h = StudyHistory(tmp_path / "metrics.json", study={"privacy": {"delta": 1e-5}}, study_id="s")
    for n in (1, 2, 3):
        rec = h.round(n)
        for i, name in enumerate(("hospital-1", "hospital-2", "hospital-3")):
            rec.site(name).update({"study_epsilon": 2.0 * n, "study_epsilon_budget": 8.0, "epsilon": 4.0 + 2.0 * n,
                                   "epsilon_budget": 20.0, "val_epsilon": 0.1 * n, "val_epsilon_budget": 1.0,
                                   "val_loss": 0.5 + 0.1 * i})
        rec.pooled = {"auc": 0.8, "loss": 0.4, "sensitivity": 0.7, "specificity": 0.9}
        rec.global_test = {"auc": 0.8, "loss": 0.45, "sensitivity": 0.7, "specificity": 0.9}
    return h


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_epsilon_plot_has_one_panel_per_account_with_its_own_budget(tmp_path: Path) -> None:
    fig = privacy_figure(_history(tmp_path))

    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["this study", "dataset lifetime (all studies)", "validation account"]
    study_ax, life_ax, val_ax = fig.axes
    assert "budget epsilon=8" in _labels(study_ax) and "budget epsilon=20" not in _labels(study_ax)
    assert "budget epsilon=20" in _labels(life_ax) and "budget epsilon=8" not in _labels(life_ax)
    assert "budget epsilon=1" in _labels(val_ax)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()


def test_coinciding_curves_are_all_drawn_apart_and_the_legend_says_so(tmp_path: Path) -> None:
    ax = privacy_figure(_history(tmp_path)).axes[0]

    site_lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 4]  # round 0 plus three rounds
    assert len(site_lines) == 3
    xs = {tuple(ln.get_xdata()) for ln in site_lines}
    assert len(xs) == 3  # offset sideways: no curve hides another
    assert all(abs(a - b) <= 0.25 for x in xs for a, b in zip(x, (0, 1, 2, 3)))
    assert len({ln.get_marker() for ln in site_lines}) == 3
    labels = _labels(ax)
    assert "hospital-1" in labels
    assert "hospital-2 (= hospital-1, curves coincide)" in labels
    assert "hospital-3 (= hospital-1, curves coincide)" in labels


def test_every_plot_labels_its_axes(tmp_path: Path) -> None:
    h = _history(tmp_path)
    for fig in (losses_figure(h), metrics_figure(h), privacy_figure(h)):
        for ax in fig.axes:
            assert ax.get_xlabel() == "round"
            assert ax.get_ylabel(), ax.get_title()
    distinct = losses_figure(h).axes[0]
    assert {"hospital-1", "hospital-2", "hospital-3"} <= set(_labels(distinct))  # different curves: own entries
    paths = write_plots(h, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_progress_and_table_show_both_accounts(tmp_path: Path) -> None:
    from rich.console import Console

    h = _history(tmp_path)
    line = site_privacy(h.round(3).hospitals["hospital-1"])
    console = Console(record=True, width=250)
    console.print(privacy_table(h))
    table = console.export_text()

    assert line == "study eps 6.00/8 (lifetime 10.00/20)"
    assert "study eps" in table and "lifetime eps" in table and "val eps" in table
    row = next(r for r in table.splitlines() if "hospital-1" in r)
    for cell in ("6.000", "8", "75%", "10.000", "20", "50%", "0.300"):
        assert cell in row, (cell, row)
    p = h.privacy()["hospital-1"]
    assert (p["study_epsilon"], p["study_budget"], p["epsilon"], p["budget"]) == (6.0, 8.0, 10.0, 20.0)
