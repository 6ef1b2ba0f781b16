"""``fedrad sweep``: run a study once per value of one field and plot the variants together."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from fedrad.common.cli import console
from fedrad.common.config import load_study
from fedrad.common.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sweep",
        help="run a study once per value of one field (e.g. --lr 0.01 0.03 0.1) and plot them together",
        description="Simulate the study once per value of one field and draw the pooled validation loss and AUC "
        "per round of every variant in one figure (sweep.png). Every variant spends every site's privacy budget: "
        "in a deployment the variants compose on each hospital's ledger.",
    )
    p.add_argument("--config", type=Path, required=True, help="study YAML")
    p.add_argument("--lr", type=float, nargs="+", help="values of training.lr")
    p.add_argument("--grid", nargs="+", metavar=("FIELD", "VALUE"),
                   help="a dotted study field and its values, e.g. --grid privacy.epsilon 1 3 8")
    p.add_argument("--out", type=Path, help="sweep folder (default: <output.dir>/<name>-sweep-<timestamp>)")
    p.set_defaults(handler=run)


def _grid(args: argparse.Namespace) -> tuple[str, list[Any]]:
    if (args.lr is None) == (args.grid is None):
        raise ConfigError("<command line>", ["<command line>: give exactly one of --lr or --grid"])
    if args.lr is not None:
        return "training.lr", list(args.lr)
    if len(args.grid) < 2:
        raise ConfigError("<command line>", ["<command line>: --grid needs a field and at least one value"])
    return args.grid[0], [yaml.safe_load(v) for v in args.grid[1:]]


def run(args: argparse.Namespace) -> int:
    from fedrad.server.sweep import privacy_cost, run_sweep

    dotted, values = _grid(args)
    study = load_study(args.config)
    out = args.out or Path(study.output.dir) / f"{study.federation.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"sweep of {dotted} over {values} for study [bold]{study.federation.name}[/]; outputs in {out}")
    console.print(f"[yellow]privacy:[/] {privacy_cost(study, len(values))}")
    variants = run_sweep(study, dotted=dotted, values=values, out=out.resolve())
    for v in variants:
        auc = v.final_test.get("auc")
        console.print(f"{dotted} = {v.value}: {v.status}, test AUC "
                      f"{'-' if auc is None else format(float(auc), '.4f')} ({v.run_dir})")
    console.print(f"figure: {out / 'sweep.png'}")
    return 0 if all(v.status == "completed" for v in variants) else 1
