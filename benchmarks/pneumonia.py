"""PneumoniaMNIST benchmark: centralised vs federated, with and without DP (not a test).

Runs each configuration in ``benchmarks/configs/`` as a simulated federation (the centralised
baseline is a federation of one hospital holding all training data: same model, same number
of epochs) once per seed, then prints test AUC / accuracy on the official test split (624
images) as mean ± standard deviation over seeds, and the mean wall time. Usage::

    python benchmarks/pneumonia.py [--only NAME ...] [--seeds 42 43 44] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedrad.common.cli import setup_logging
from fedrad.common.config import load_study
from fedrad.server.simulation import simulate

CONFIGS = Path(__file__).parent / "configs"
ORDER = ["centralised", "federated", "federated-dp-eps8", "federated-dp-eps3"]


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {ORDER}")
    ap.add_argument("--seeds", nargs="*", type=int, default=[42], help="federation seeds (partition, init, noise)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    setup_logging(0)
    console = Console(width=150)
    results: list[dict[str, object]] = []
    table_rows = []
    for name in args.only or ORDER:
        base = load_study(CONFIGS / f"{name}.yaml")
        aucs, accs, walls, epss = [], [], [], []
        for seed in args.seeds:
            study = base.model_copy(update={"federation": base.federation.model_copy(update={"seed": seed})})
            run_dir = args.out / f"{name}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            history = simulate(study, run_dir=run_dir)
            wall = time.perf_counter() - t0
            g = history.final_test
            eps = max((p["epsilon"] for p in history.privacy().values()), default=None)
            aucs.append(float(g["auc"]))
            accs.append(float(g["accuracy"]))
            walls.append(wall)
            if eps is not None:
                epss.append(float(eps))
            results.append({"name": name, "seed": seed, "auc": g["auc"], "accuracy": g["accuracy"],
                            "max_epsilon": eps, "wall_s": wall})
            console.print(f"{name} seed {seed}: AUC {g['auc']:.4f} ACC {g['accuracy']:.4f} in {wall:.0f}s")
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
        table_rows.append((name, base, aucs, accs, epss, walls))
    table = Table(title=f"PneumoniaMNIST test split (624 images), seeds {args.seeds}")
    for col in ("configuration", "hospitals", "DP (eps, delta)", "rounds x local epochs", "test AUC", "test ACC",
                "max eps spent", "wall time (mean)"):
        table.add_column(col, justify="right")
    for name, study, aucs, accs, epss, walls in table_rows:
        dp = f"{study.privacy.epsilon:g}, {study.privacy.delta:g}" if study.privacy.enabled else "off"
        table.add_row(name, str(study.federation.num_hospitals), dp,
                      f"{study.federation.rounds} x {study.training.local_epochs}", _ms(aucs), _ms(accs),
                      f"{max(epss):.3f}" if epss else "-", f"{statistics.mean(walls):.0f} s")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
