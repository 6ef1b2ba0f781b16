"""Issue 10 benchmark: models that help clinicians under DP, with the product's defaults (not a test).

Rows (each the bundled demo study, ``fedrad/configs/demo.yaml``, with only what the row names
changed): ``demo-eps8`` (3 non-IID hospitals, epsilon 8), ``demo-eps1``, ``demo-eps3``,
``demo-nodp``, ``hosp20-eps8`` (20 hospitals), ``small-eps8`` ("small sites": 3 hospitals of
about 225 training images each with about 22 % positives, drawn from the training split; their
validation shares drawn alike; official test split). Prints test AUC and sensitivity /
specificity at the operating threshold chosen on pooled validation, the fraction of test images
predicted positive (a one-class model reads 0 or 1), and wall time. Usage::

    python benchmarks/issue10.py --rows demo-eps8 small-eps8 --seeds 42 43 44 \
        [--set training.class_weighting=balanced ...] [--out runs/issue10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedrad import bundled_path
from fedrad.common.cli import setup_logging
from fedrad.common.config import StudyConfig, load_study, parse_study

ROWS: dict[str, dict[str, Any]] = {
    "demo-eps8": {},
    "demo-eps3": {"privacy.epsilon": 3.0},
    "demo-eps1": {"privacy.epsilon": 1.0},
    "demo-nodp": {"privacy.enabled": False},
    "hosp20-eps8": {"federation.num_hospitals": 20},
    "small-eps8": {"data.partition.scheme": "iid", "@small": True},
}


def small_sites_npz(out: Path, *, seed: int, per_site: int = 225, sites: int = 3, positives: float = 0.22) -> Path:
    """An npz holding ``sites x per_site`` training images with ``positives`` pneumonia, drawn from
    the bundled training split (validation alike, 40 per site), and the official test split."""
    src = np.load(bundled_path("data", "pneumoniamnist.npz"))
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", per_site * sites), ("val", 40 * sites)):
        y = src[f"{split}_labels"].reshape(-1)
        pos = rng.choice(np.flatnonzero(y == 1), int(round(n * positives)), replace=False)
        neg = rng.choice(np.flatnonzero(y == 0), n - len(pos), replace=False)
        idx = rng.permutation(np.concatenate([pos, neg]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = src[f"{split}_images"][idx], src[f"{split}_labels"][idx]
    arrays["test_images"], arrays["test_labels"] = src["test_images"], src["test_labels"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def row_study(base: StudyConfig, row: str, seed: int, overrides: dict[str, Any], out: Path) -> StudyConfig:
    d = base.to_dict()
    for dotted, value in {**ROWS[row], **overrides, "federation.seed": seed}.items():
        if dotted == "@small":
            _set(d, "data.path", str(small_sites_npz(out / f"small-sites-{seed}.npz", seed=seed)))
        else:
            _set(d, dotted, value)
    _set(d, "federation.name", f"issue10-{row}")
    return parse_study(d, source=f"<{row}>")


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="study overrides (a variant)")
    ap.add_argument("--out", type=Path, default=Path("runs/issue10"))
    args = ap.parse_args()
    setup_logging(0)
    from fedrad.server.simulation import simulate

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    tag = ",".join(args.set) or "defaults"
    base = load_study(bundled_path("configs", "demo.yaml"))
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    for row in args.rows:
        for seed in args.seeds:
            study = row_study(base, row, seed, overrides, args.out)
            run_dir = args.out / f"{row}-{tag.replace('=', '-')}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            history = simulate(study, run_dir=run_dir)
            wall = time.perf_counter() - t0
            g = history.final_test
            sens, spec = g.get("sensitivity"), g.get("specificity")
            # the official test split: 390 pneumonia, 234 normal
            pp = None if sens is None or spec is None else (sens * 390 + (1 - spec) * 234) / 624
            rec = {"row": row, "variant": tag, "seed": seed, "status": history.status, "auc": g.get("auc"),
                   "sensitivity": g.get("sensitivity"), "specificity": g.get("specificity"),
                   "accuracy": g.get("accuracy"), "threshold": g.get("threshold"),
                   "predicted_positive": pp, "wall_s": wall,
                   "events": history.events}
            with results_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)  # noqa: T201 - a benchmark script's output
    rows = [json.loads(line) for line in results_path.read_text().splitlines()]
    print("| row | variant | seeds | test AUC | sensitivity | specificity | predicted positive | wall (mean) |")  # noqa: T201
    print("|---|---|---|---|---|---|---|---|")  # noqa: T201
    for row in args.rows:
        rs = [r for r in rows if r["row"] == row and r["variant"] == tag and r["auc"] is not None]
        if rs:
            print(f"| {row} | {tag} | {[r['seed'] for r in rs]} | {_ms([r['auc'] for r in rs])} | "  # noqa: T201
                  f"{_ms([r['sensitivity'] for r in rs])} | {_ms([r['specificity'] for r in rs])} | "
                  f"{_ms([r['predicted_positive'] for r in rs])} | {statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
