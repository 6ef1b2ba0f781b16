"""``fedrad simulate``: run a study as a simulated federation of hospitals on this machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from fedrad import bundled_path
from fedrad.common.cli import console
from fedrad.common.config import StudyConfig, load_study


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a simulated federation (default: the bundled PneumoniaMNIST demo)",
        description="Run the study described in a YAML file as a simulated federation of hospitals. "
        "Without --config, runs the bundled demo (3 hospitals, DP-SGD, FedAvg on PneumoniaMNIST). "
        "Giving --out of an earlier, unfinished run resumes it from its last checkpoint.",
    )
    p.add_argument("--config", type=Path, help="study YAML (default: the bundled demo)")
    p.add_argument("--out", type=Path, help="run folder (default: <output.dir>/<name>-<timestamp>)")
    p.set_defaults(handler=run)


def run_folder(study: StudyConfig, out: Path | None) -> Path:
    if out is not None:
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(study.output.dir) / f"{study.federation.name}-{stamp}"


def run(args: argparse.Namespace) -> int:
    from fedrad.server.report import RichReporter, final_table, privacy_table, rounds_table
    from fedrad.server.simulation import simulate

    config_path: Path = args.config or bundled_path("configs", "demo.yaml")
    study = load_study(config_path)
    if args.config is None and args.out is None:
        study = study.model_copy(update={"output": study.output.model_copy(update={"dir": str(Path("runs").resolve())})})
    run_dir = run_folder(study, args.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(study.to_dict(), sort_keys=False), encoding="utf-8")
    console.print(f"study [bold]{study.federation.name}[/] from {config_path}; outputs in {run_dir}")
    t0 = time.perf_counter()
    history = simulate(study, run_dir=run_dir, reporter=RichReporter(console))
    console.print(rounds_table(history))
    console.print(privacy_table(history))
    if history.final_test:
        console.print(final_table(history))
    for event in history.events:
        console.print(f"[yellow]note:[/] {event}")
    console.print(f"{history.status} in {time.perf_counter() - t0:.0f}s. Outputs: {run_dir}/"
                  "{metrics.json, model.pt, checkpoints/, loss.png, epsilon.png, metrics.png}")
    return 0 if history.status == "completed" else 1
