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
    python benchmarks/issue10.py --rescore runs/issue10/RUN_FOLDER ...

Each result line also holds ``checkpoints``: the test AUC of every round's global weights and of
exponential moving averages (decay 0.5 and 0.8) of them, read from the run folder's per-round
checkpoints (benchmark only: the product does not average; sensitivity / specificity there are at the
run's own operating threshold). ``--rescore`` prints the same for existing run folders.
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
from fedrad.common.config import StudyConfig, parse_study

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


def row_study(base: dict[str, Any], row: str, seed: int, overrides: dict[str, Any], out: Path) -> StudyConfig:
    """The demo study as its YAML is written, with the row's and the variant's fields set; parsed
    afterwards, so the defaults that depend on the budget (model, lr) follow the row's epsilon."""
    d = json.loads(json.dumps(base))
    for dotted, value in {**ROWS[row], **overrides, "federation.seed": seed}.items():
        if dotted == "@small":
            _set(d, "data.path", str(small_sites_npz(out / f"small-sites-{seed}.npz", seed=seed)))
        else:
            _set(d, dotted, value)
    _set(d, "federation.name", f"issue10-{row}")
    return parse_study(d, source=f"<{row}>")


EMA_DECAYS = (0.5, 0.8)


def checkpoint_metrics(study: StudyConfig, run_dir: Path, *, threshold: float | None) -> dict[str, Any]:
    """Benchmark-only: test AUC (and sensitivity / specificity at the run's operating threshold) of the last
    round's global weights and of exponential moving averages of the per-round global weights the run folder
    keeps (``checkpoints/round-NNNN.pt``, ``output.checkpoint_every: 1``). Nothing here changes the product."""
    import torch

    from fedrad.common.datasets import load_npz, npz_source_path
    from fedrad.common.evaluation import evaluate
    from fedrad.common.models import build_model
    from fedrad.server.checkpoints import CKPT_RE, load_checkpoint

    paths = sorted((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("round-*.pt")
                   if (m := CKPT_RE.search(p.name)))
    if not paths or study.data.source != "npz":
        return {}
    test = load_npz(npz_source_path(study.data.path), channels=study.data.channels,
                    image_size=study.data.image_size)["test"]
    model = build_model(study.model.name, in_channels=study.data.channels,
                        num_classes=len(study.data.class_names), image_size=study.data.image_size,
                        options=dict(study.model.options))
    dev = torch.device("cpu")

    def score(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        model.load_state_dict(state)
        s = evaluate(model, test, device=dev, threshold=threshold).test_metrics()
        return {"auc": s.get("auc"), "sensitivity": s.get("sensitivity"), "specificity": s.get("specificity")}

    states = [(n, load_checkpoint(p)["state_dict"]) for n, p in paths]
    out: dict[str, Any] = {"rounds": [n for n, _ in states], "last": score(states[-1][1]),
                           "per_round_auc": [score(sd)["auc"] for _, sd in states]}
    for d in EMA_DECAYS:
        ema = {k: v.clone().double() for k, v in states[0][1].items()}
        for _, sd in states[1:]:
            for k in ema:
                ema[k].mul_(d).add_(sd[k].double(), alpha=1 - d)
        out[f"ema{d}"] = score({k: v.float() for k, v in ema.items()})
    return out


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
    ap.add_argument("--rescore", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                    help="only print the last-round / EMA test metrics of existing run folders")
    args = ap.parse_args()
    setup_logging(0)
    if args.rescore:
        from fedrad.server.checkpoints import load_checkpoint

        for run_dir in args.rescore:
            last = sorted((run_dir / "checkpoints").glob("round-*.pt"))[-1]
            study = parse_study(load_checkpoint(last)["study"], source=str(last))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            threshold = (metrics.get("operating_threshold") or {}).get("value")
            rec = {"run": str(run_dir), "final": metrics.get("global_test"), "chosen_round":
                   (metrics.get("model") or {}).get("round"),
                   "checkpoints": checkpoint_metrics(study, run_dir, threshold=threshold)}
            print(json.dumps(rec), flush=True)  # noqa: T201 - a benchmark script's output
        return 0
    from fedrad.server.simulation import simulate

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    tag = ",".join(args.set) or "defaults"
    base = yaml.safe_load(bundled_path("configs", "demo.yaml").read_text(encoding="utf-8"))
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
            threshold = (history.operating_threshold or {}).get("value")
            ckpt = checkpoint_metrics(study, run_dir, threshold=threshold)
            # rounds where a hospital failed (e.g. a simulation worker killed for memory): such a run is no
            # measurement of the variant (a hospital that refuses a hopeless plan is the product's behaviour)
            bad = [r["round"] for r in json.loads((run_dir / "metrics.json").read_text()).get("rounds", [])
                   if not r.get("aggregated")
                   or any(str(h.get("status", "")).startswith("failed") for h in r.get("hospitals", {}).values())]
            sens, spec = g.get("sensitivity"), g.get("specificity")
            # the official test split: 390 pneumonia, 234 normal
            pp = None if sens is None or spec is None else (sens * 390 + (1 - spec) * 234) / 624
            rec = {"row": row, "variant": tag, "seed": seed, "status": history.status, "auc": g.get("auc"),
                   "sensitivity": g.get("sensitivity"), "specificity": g.get("specificity"),
                   "accuracy": g.get("accuracy"), "threshold": g.get("threshold"),
                   "predicted_positive": pp, "wall_s": wall,
                   "chosen_round": (history.model_choice or {}).get("round"), "bad_rounds": bad, "checkpoints": ckpt,
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
