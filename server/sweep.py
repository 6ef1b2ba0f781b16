"""A sweep over one study field (e.g. the learning rate): each value is a full simulated study, and
the variants' pooled validation loss and AUC per round go into one figure (the seed papers'
Figure 3: the effect of the learning rate).

Privacy: every variant is a whole study, so every variant spends each site's budget. Here each
variant gets its own run folder, hence its own fresh simulated ledgers; in a deployment the same
sweep would compose over the variants on every hospital's ledger (k variants of epsilon e cost
up to k x e). :func:`privacy_cost` states this.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedrad.common.config import StudyConfig, parse_study  # noqa: E402
from fedrad.common.errors import ConfigError  # noqa: E402

from .history import StudyHistory, write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Variant:
    value: Any
    run_dir: Path
    status: str = "not run"
    #: Pooled validation per round: {round: {"loss": ..., "auc": ...}} (from the sites' DP histograms).
    pooled: dict[int, dict[str, float | None]] = field(default_factory=dict)
    final_test: dict[str, Any] = field(default_factory=dict)


def with_field(study: StudyConfig, dotted: str, value: Any) -> StudyConfig:
    """``study`` with one dotted field (e.g. ``training.lr``) replaced, validated like a loaded YAML."""
    data = study.to_dict()
    *parents, leaf = dotted.split(".")
    node: Any = data
    for part in parents:
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ConfigError("<sweep>", [f"<sweep>: {dotted}: no such study field (got {value!r})"])
        node = node[part]
    node[leaf] = value
    return parse_study(data, source=f"<sweep {dotted}={value!r}>")


def privacy_cost(study: StudyConfig, n_variants: int) -> str:
    """One sentence: what the sweep costs each site's privacy."""
    if not study.privacy.enabled:
        return f"{n_variants} variants without DP: no privacy guarantee for any of them."
    eps = study.privacy.epsilon
    return (f"each of the {n_variants} variants spends every site's budget (epsilon {eps:g}, delta "
            f"{study.privacy.delta:g}); here each variant has fresh simulated ledgers, but in a deployment the "
            f"sweep would compose on every hospital's ledger: up to epsilon {n_variants * eps:g} in all.")


def _slug(dotted: str, value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{dotted}={value}")


def run_sweep(study: StudyConfig, *, dotted: str, values: list[Any], out: Path) -> list[Variant]:
    """Simulate ``study`` once per value of ``dotted``; writes ``sweep.json`` and ``sweep.png`` in ``out``."""
    from .simulation import simulate  # local: starts the simulation engine machinery

    if not values:
        raise ConfigError("<sweep>", [f"<sweep>: {dotted}: at least one value is needed"])
    studies = [with_field(study, dotted, v) for v in values]  # every variant validated before anything runs
    out.mkdir(parents=True, exist_ok=True)
    log.info("sweep over %s: %s", dotted, privacy_cost(study, len(values)))
    variants = []
    for value, variant_study in zip(values, studies):
        v = Variant(value=value, run_dir=out / _slug(dotted, value))
        history = simulate(variant_study, run_dir=v.run_dir)
        v.status = history.status
        v.pooled = _pooled(history)
        v.final_test = dict(history.final_test)
        variants.append(v)
        write_summary(out / "sweep.json", study=study, dotted=dotted, variants=variants)
    plot_sweep(variants, dotted=dotted, path=out / "sweep.png", title=study.federation.name)
    return variants


def _pooled(history: StudyHistory) -> dict[int, dict[str, float | None]]:
    return {n: {"loss": rec.pooled.get("loss"), "auc": rec.pooled.get("auc")}
            for n, rec in sorted(history.rounds.items()) if rec.pooled}


def write_summary(path: Path, *, study: StudyConfig, dotted: str, variants: list[Variant]) -> None:
    write_json_atomic(path, {
        "field": dotted, "privacy": privacy_cost(study, len(variants)),
        "variants": [{"value": v.value, "run_dir": str(v.run_dir), "status": v.status,
                      "pooled_validation": {str(k): x for k, x in v.pooled.items()},
                      "final_test": v.final_test} for v in variants],
    })


def plot_sweep(variants: list[Variant], *, dotted: str, path: Path, title: str = "sweep") -> Path:
    """Pooled validation loss (left) and AUC (right) per round, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        for ax, key in zip(axes, ("loss", "auc")):
            pts = [(n, float(m[key])) for n, m in sorted(v.pooled.items())  # type: ignore[arg-type]
                   if m.get(key) is not None and math.isfinite(float(m[key]))]  # type: ignore[arg-type]
            if pts:
                ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o", label=f"{dotted} = {v.value}")
    axes[0].set_ylabel("pooled validation loss (from DP histograms)")
    axes[1].set_ylabel("pooled validation AUC (from DP histograms)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: effect of {dotted}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
