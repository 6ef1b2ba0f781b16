"""``fedrad run|status|logs|stop``: submit studies to the running coordinator and follow them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedrad.common.cli import console, err_console

from .cmd_coordinator import add_prov_argument, prov_dir


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser(
        "run", help="submit a study to the running coordinator and follow it",
        description="Waits until the study's hospitals are online (naming the missing ones on timeout), submits "
        "the study to the coordinator's SuperLink and shows progress per round. The run folder (--out, default "
        "<output.dir>/<name>-<timestamp>) gets the same outputs as a simulation; its path reaches the ServerApp "
        "through the run config (run-config.toml in the run folder).")
    add_prov_argument(r)
    r.add_argument("--config", type=Path, required=True, help="study YAML (on the coordinator)")
    r.add_argument("--out", type=Path, help="run folder (an unfinished run folder of the same study resumes)")
    r.add_argument("--wait", type=float, default=300.0,
                   help="seconds to wait for federation.num_hospitals hospitals to be online (default 300)")
    r.add_argument("--poll-interval", type=float, default=0.25,
                   help="ServerApp: seconds between checks for hospital replies (0: Flower's Grid, 3 s)")
    r.add_argument("--detach", action="store_true", help="submit and return; follow later with `fedrad status`")
    r.set_defaults(handler=run_run)
    s = sub.add_parser("status", help="the coordinator, its hospitals (online or not) and its runs")
    add_prov_argument(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=run_status)
    lg = sub.add_parser("logs", help="the ServerApp log of a run (default: the latest)")
    add_prov_argument(lg)
    lg.add_argument("run_id", nargs="?")
    lg.set_defaults(handler=run_logs)
    st = sub.add_parser("stop", help="stop a run (default: the one running)")
    add_prov_argument(st)
    st.add_argument("run_id", nargs="?")
    st.set_defaults(handler=run_stop)


def _running(co: Any) -> dict[str, Any]:
    from fedrad.common.errors import FederationError
    from fedrad.server import coordinator as cdn

    info = co.info()
    problem = cdn.probe(info["address"], ca=None if info.get("insecure") else co.ca, insecure=bool(info.get("insecure")))
    if problem:
        raise FederationError(problem)
    return dict(info)


def run_run(args: argparse.Namespace) -> int:
    from fedrad.common.config import load_study
    from fedrad.common.errors import ConfigError, FederationError
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    study_file = args.config.resolve()
    study = load_study(study_file)  # every config problem surfaces here, before anything is submitted
    fed = study.federation
    least = fed.min_hospitals
    problems = [f"{study_file}: data.{k}: a simulation setting; deployed hospitals train on their whole dataset "
                f"and refuse such a study (got {v!r})"
                for k, v in (("max_train_per_hospital", study.data.max_train_per_hospital),
                             ("max_val_per_hospital", study.data.max_val_per_hospital)) if v is not None]
    if study.simulation.reproducible_randomness:
        problems.append(f"{study_file}: simulation.reproducible_randomness: deployed hospitals draw all DP "
                        "randomness from OS entropy and refuse such a study (got True)")
    if study.secure_aggregation.enabled:  # SecAgg+ in deployment: its settings are checked before submitting
        from fedrad.server.secagg import MIN_SURVIVORS, SecAggSettings

        try:
            SecAggSettings.from_study(study).check(study)
        except ConfigError as exc:
            problems += [f"{study_file}: {p}" for p in exc.problems]
        least = max(least, MIN_SURVIVORS)  # a masked sum of fewer hospitals is never unmasked
    if problems:  # every problem in one report, before anything is submitted
        raise ConfigError(str(study_file), problems)
    info = _running(co)
    if not info.get("insecure"):
        registered = len(co.registry())
        if registered < least:
            raise FederationError(f"the study needs {least} hospitals but only {registered} are "
                                  f"registered; provision more (fedrad provision add-node) and `fedrad coordinator register`")
    try:
        online = cdn.wait_for_hospitals(co, needed=fed.num_hospitals, timeout=args.wait)
    except FederationError as exc:
        online = [n for n in cdn.list_nodes(co) if n.status == "online"]
        if len(online) < least:
            raise
        err_console.print(f"[yellow]warning:[/] {exc}; starting with the {len(online)} online "
                          f"(at least {least} needed)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (args.out or Path(study.output.dir) / f"{fed.name}-{stamp}").resolve()
    run_id = cdn.submit(co, study_file=study_file, run_dir=run_dir, poll_interval=args.poll_interval)
    console.print(f"submitted study [bold]{fed.name}[/] as run {run_id} with {len(online)} hospitals online "
                  f"({', '.join(n.name for n in online)}); outputs in {run_dir}", soft_wrap=True)
    if args.detach:
        console.print(f"follow with `fedrad status`, `fedrad logs {run_id}`; stop with `fedrad stop {run_id}`")
        return 0
    try:
        return follow(co, run_id, run_dir, total_rounds=fed.rounds)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; the run goes on (fedrad stop --prov {co.prov} {run_id})")
        return 130


def follow(co: Any, run_id: str, run_dir: Path, *, total_rounds: int, poll: float = 1.0) -> int:
    """Show rounds as they finish (from the run folder's metrics.json) until the run ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrad.server import coordinator as cdn

    names = co.names_by_node_id()
    shown = 0
    status, details = "pending", ""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"run {run_id}: pending", total=total_rounds)
        while True:
            rounds = _rounds(run_dir / "metrics.json")
            for rec in rounds[shown:]:
                if rec.get("global_test") or rec.get("seconds"):
                    progress.console.print(_round_line(rec, names), soft_wrap=True)
                    shown += 1
            progress.update(task, completed=shown, description=f"run {run_id}: {status}")
            found = cdn.runs(co, run_id)
            if found:
                status, details = str(found[0].get("status", "?")), str(found[0].get("status-details", ""))
            if status.startswith("finished"):
                break
            time.sleep(poll)
    for rec in _rounds(run_dir / "metrics.json")[shown:]:
        console.print(_round_line(rec, names), soft_wrap=True)
    if status == "finished:completed":
        console.print(f"[green]run {run_id} completed[/]. Outputs: {run_dir}/"
                      "{metrics.json, model.pt, checkpoints/, loss.png, epsilon.png, metrics.png}", soft_wrap=True)
        return 0
    err_console.print(f"[red]run {run_id} {status}[/]: {details} (fedrad logs --prov {co.prov} {run_id})")
    return 1


def _rounds(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("rounds", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _round_line(rec: dict[str, Any], names: dict[str, str]) -> str:
    parts = []
    for key, h in sorted(rec.get("hospitals", {}).items()):
        name = names.get(key.removeprefix("node-"), key)
        st = str(h.get("status", "ok"))
        if st != "ok":
            parts.append(f"{name} [yellow]{st.split(':')[0]}[/]")
        else:
            eps = h.get("study_epsilon", h.get("epsilon"))
            what = "masked" if h.get("secure_aggregation") == "masked update" else "ok"
            parts.append(f"{name} {what}" + (f" eps {eps:.2f}" if isinstance(eps, (int, float)) else ""))
    test = rec.get("global_test") or {}
    val = rec.get("pooled_validation") or {}
    tail = f" | val AUC {val['auc']:.3f}" if isinstance(val.get("auc"), (int, float)) else ""
    tail += f" | test AUC {test['auc']:.3f}" if isinstance(test.get("auc"), (int, float)) else ""
    return f"round {rec.get('round')} ({float(rec.get('seconds') or 0):.1f}s): " + "; ".join(parts) + tail


def run_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    info = _running(co)
    nodes = cdn.list_nodes(co)
    runs = cdn.runs(co)
    if args.json:
        console.print(json.dumps({"coordinator": info, "nodes": [n.__dict__ for n in nodes], "runs": runs}, indent=1),
                      markup=False, highlight=False, soft_wrap=True)
        return 0
    mode = "plaintext (testing only)" if info.get("insecure") else "TLS, node authentication"
    console.print(f"coordinator {info['address']} ({mode}), up since {info['started']}")
    t = Table("hospital", "node id", "status")
    for n in sorted(nodes, key=lambda n: n.name):
        t.add_row(n.name, n.node_id, n.status)
    console.print(t)
    r = Table("run", "status", "elapsed (s)", "details")
    for run in runs[-10:]:
        r.add_row(str(run.get("run-id")), str(run.get("status")), f"{float(run.get('elapsed') or 0):.0f}",
                  str(run.get("status-details", ""))[:80])
    console.print(r)
    return 0


def _pick(co: Any, run_id: str | None, *, running: bool) -> str:
    from fedrad.common.errors import FederationError
    from fedrad.server import coordinator as cdn

    if run_id:
        return run_id
    runs = cdn.runs(co)
    if running:
        runs = [r for r in runs if not str(r.get("status", "")).startswith("finished")]
    if not runs:
        raise FederationError("no " + ("running " if running else "") + "run on this coordinator")
    return str(max(runs, key=lambda r: str(r.get("pending-at", "")))["run-id"])


def run_logs(args: argparse.Namespace) -> int:
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    _running(co)
    console.print(cdn.logs(co, _pick(co, args.run_id, running=False)), markup=False, highlight=False, end="")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from fedrad.server import coordinator as cdn

    co = cdn.Coordinator(prov_dir(args.prov))
    _running(co)
    run_id = _pick(co, args.run_id, running=True)
    folder = cdn.stop(co, run_id)
    console.print(f"run {run_id} stopped" + (f"; {folder}/metrics.json says 'interrupted' "
                                             f"(`fedrad run` of the same study with `--out {folder}` resumes it)" if folder else ""),
                  soft_wrap=True)
    return 0
