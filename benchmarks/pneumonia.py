"""PneumoniaMNIST benchmark: centralised vs federated, with and without DP (not a test).

Runs each configuration in ``benchmarks/configs/`` as a simulated federation (the centralised
baseline is a federation of one hospital holding all training data: same model, same epochs),
then prints a table of test AUC / accuracy on the official test split (624 images) and wall
time. Usage::

    python benchmarks/pneumonia.py [--only NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedrad.common.cli import setup_logging
from fedrad.common.config import load_study
from fedrad.server.simulation import simulate

CONFIGS = Path(__file__).parent / "configs"
ORDER = ["centralised", "federated", "federated-dp-eps8", "federated-dp-eps3"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {ORDER}")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    setup_logging(0)
    console = Console()
    rows = []
    for name in args.only or ORDER:
        study = load_study(CONFIGS / f"{name}.yaml")
        run_dir = args.out / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        history = simulate(study, run_dir=run_dir)
        wall = time.perf_counter() - t0
        g = history.final_test
        eps = [p["epsilon"] for p in history.privacy().values()]
        rows.append((name, study, g, max(eps) if eps else None, wall))
        console.print(f"{name}: AUC {g.get('auc'):.4f} ACC {g.get('accuracy'):.4f} in {wall:.0f}s")
        (args.out / "results.json").write_text(json.dumps(
            [{"name": n, "auc": r.get("auc"), "accuracy": r.get("accuracy"), "epsilon": e, "wall_s": w}
             for n, _, r, e, w in rows], indent=1))
    table = Table(title="PneumoniaMNIST test split (624 images)")
    for col in ("configuration", "hospitals", "DP (eps, delta)", "rounds x local epochs", "test AUC", "test ACC",
                "max eps spent", "wall time"):
        table.add_column(col, justify="right")
    for name, study, g, eps, wall in rows:
        dp = f"{study.privacy.epsilon:g}, {study.privacy.delta:g}" if study.privacy.enabled else "off"
        table.add_row(name, str(study.federation.num_hospitals), dp,
                      f"{study.federation.rounds} x {study.training.local_epochs}",
                      f"{g['auc']:.4f}", f"{g['accuracy']:.4f}", "-" if eps is None else f"{eps:.3f}", f"{wall:.0f} s")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
