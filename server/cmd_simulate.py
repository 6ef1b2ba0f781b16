"""``fedrad simulate``: run a study as a simulated federation of hospitals on this machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedrad import bundled_path
from fedrad.common.cli import console
from fedrad.common.config import StudyConfig, load_study

#: Exit code of a study stopped by Ctrl-C (SIGINT) after its state was saved (128 + SIGINT).
EXIT_INTERRUPTED = 130


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a simulated federation (default: the bundled PneumoniaMNIST demo)",
        description="Run the study described in a YAML file as a simulated federation of hospitals. "
        "Without --config, runs the bundled demo (3 hospitals, DP-SGD, FedAvg on PneumoniaMNIST). "
        "Giving --out of an earlier, unfinished run resumes it from its last checkpoint (with the run's "
        "own config.yaml unless --config is given). Ctrl-C stops at a safe point, saves the state "
        "and exits with code 130; run the same command again to resume.",
    )
    p.add_argument("--config", type=Path, help="study YAML (default: the run's own config.yaml when --out "
                   "names an earlier run, else the bundled demo)")
    p.add_argument("--out", type=Path, help="run folder (default: <output.dir>/<name>-<timestamp>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every simulated hospital's DP plan (released size, sampling rate, steps, noise, "
                   "expected epsilon, warnings) and exit without training or spending anything")
    p.set_defaults(handler=run)


def run_folder(study: StudyConfig, out: Path | None) -> Path:
    if out is not None:
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(study.output.dir) / f"{study.federation.name}-{stamp}"


def choose_study(config: Path | None, out: Path | None) -> tuple[StudyConfig, Path]:
    """The study to run and where it came from: ``--config``; else the run folder's own
    ``config.yaml`` (resume); else the bundled demo (outputs under ./runs)."""
    from fedrad.server.resume import CONFIG_NAME, study_for_resume

    if config is not None:
        return load_study(config), config
    if out is not None:
        own = study_for_resume(out.resolve())
        if own is not None:
            return own, out.resolve() / CONFIG_NAME
    demo = bundled_path("configs", "demo.yaml")
    study = load_study(demo)
    if out is None:
        study = study.model_copy(update={"output": study.output.model_copy(update={"dir": str(Path("runs").resolve())})})
    return study, demo


def run(args: argparse.Namespace) -> int:
    from fedrad.server.report import RichReporter, final_table, privacy_table, rounds_table
    from fedrad.server.resume import accept_run
    from fedrad.server.simulation import simulate

    study, source = choose_study(args.config, args.out)
    if args.dry_run:  # nothing is written: no run folder, no ledger
        from fedrad.common.planning import dry_run_lines

        lines = dry_run_lines(study)
        for line in lines:
            console.print(line, soft_wrap=True, markup=False)
        return 1 if lines and lines[-1].startswith("refused:") else 0
    from fedrad.server.study import check_study_data

    check_study_data(study)  # every data problem before anything is written or started
    run_dir = run_folder(study, args.out).resolve()
    # checked before anything is written: a refused resume leaves the run folder as it was
    resumed_id = accept_run(study, run_dir, rewrite_config=args.config is not None)
    verb = "resuming" if resumed_id is not None else "study"
    console.print(f"{verb} [bold]{study.federation.name}[/] from {source}; outputs in {run_dir}")
    t0 = time.perf_counter()
    history = simulate(study, run_dir=run_dir, reporter=RichReporter(console))
    console.print(rounds_table(history))
    console.print(privacy_table(history))
    if history.final_test:
        console.print(final_table(history))
    for event in history.events:
        console.print(f"[yellow]note:[/] {event}")
    if history.status == "interrupted":
        console.print(f"[yellow]interrupted[/] after {time.perf_counter() - t0:.0f}s; state saved in {run_dir}/. "
                      f"Resume with: fedrad simulate --out {run_dir}")
        return EXIT_INTERRUPTED
    choice = history.model_choice or {}
    if choice.get("is") == "last" and choice.get("note"):  # the "best" case is among the notes above
        console.print(f"model.pt: {choice['note']}")
    console.print(f"{history.status} in {time.perf_counter() - t0:.0f}s. Outputs: {run_dir}/"
                  "{metrics.json, model.pt, best-model.pt, last-model.pt, checkpoints/, governance.json, "
                  "governance.md, loss.png, epsilon.png, metrics.png}")
    return 0 if history.status == "completed" else 1
