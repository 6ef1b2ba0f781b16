"""The coordinator's study report for governance (ethics board, data-protection officers).

Written beside ``metrics.json`` as ``governance.json`` (machine-readable) and ``governance.md``
(for people). It answers: which hospitals took part (and which refused, with the rule they
cited), exactly which code ran (sha256 over the installed fedrad package's source files, the
Flower app bundle hash when deployed, library versions), exactly which settings
(``StudyConfig.fingerprint()``), exactly which model came out (sha256 over ``model.pt``'s
state-dict tensors), how much privacy budget each hospital spent (training and validation
accounts) and, per hospital, the last receipt it sent: its audit-log head and entry count right
after it recorded that reply. Kept off the node, the receipt anchors the node's audit log: a later
rewrite of the log that does not reproduce this head at this count is detectable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedrad.common.config import StudyConfig, parse_study
from fedrad.common.errors import FederationError
from fedrad.common.model_card import state_dict_sha256

from .checkpoints import load_checkpoint
from .history import StudyHistory, write_json_atomic

REPORT_VERSION = 1
JSON_NAME = "governance.json"
MARKDOWN_NAME = "governance.md"
#: The packages of the fedrad distribution (pyproject ``[tool.setuptools] packages``).
PACKAGES = ("fedrad", "fedrad.common", "fedrad.common.models", "fedrad.server", "fedrad.client", "fedrad.client.dicom")


def package_hash(packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """sha256 over the installed fedrad source files (name and content of every ``.py``), and their count."""
    lines = []
    for pkg in packages:
        mod = importlib.import_module(pkg)
        for folder in getattr(mod, "__path__", []):
            for f in sorted(Path(folder).glob("*.py")):
                lines.append(f"{pkg}/{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n")
    lines.sort()
    return {"sha256": hashlib.sha256("".join(lines).encode()).hexdigest(), "files": len(lines)}


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors: the same hash the model card records (one definition)."""
    return state_dict_sha256(state_dict)


def model_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"path": path.name, "sha256": None, "note": "no final model was written"}
    sd = load_checkpoint(path)["state_dict"]
    return {"path": path.name, "sha256": state_dict_hash(sd), "tensors": len(sd),
            "parameters": int(sum(t.numel() for t in sd.values()))}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hospitals(history: StudyHistory) -> list[dict[str, Any]]:
    privacy = history.privacy()
    receipts = history.last_receipts()
    out: dict[str, dict[str, Any]] = {}
    for n in sorted(history.rounds):
        for name, h in history.rounds[n].hospitals.items():
            rec = out.setdefault(name, {"name": name, "rounds_contributed": 0, "rounds_refused": 0, "rounds_failed": 0,
                                        "evaluations_missed": 0, "refusals": [], "train_examples": None,
                                        "last_status": "ok"})
            # train_examples: the hospital's DP-released training-set size (never the true size)
            status = str(h.get("status", "ok"))
            rec["last_status"] = status
            if h.get("num_examples") is not None:  # set only from an accepted train reply
                rec["rounds_contributed"] += 1
                rec["train_examples"] = h["num_examples"]
            if h.get("val_epsilon") is not None:
                rec["val_epsilon"] = h["val_epsilon"]
                rec["val_epsilon_budget"] = h.get("val_epsilon_budget")
            if status != "ok":
                rec["rounds_refused" if status.startswith("refused") else "rounds_failed"] += 1
                rec["refusals"].append({"round": n, "reason": status})
            val_status = str(h.get("val_status", "ok"))
            if val_status != "ok" and val_status != status:  # the round trained; its evaluation did not happen
                rec["evaluations_missed"] += 1
                rec["refusals"].append({"round": n, "reason": f"evaluation: {val_status}"})
    for name, rec in out.items():
        p = privacy.get(name, {})
        rec["study_epsilon"] = p.get("study_epsilon")  # this study's account
        rec["study_epsilon_budget"] = p.get("study_budget")
        rec["epsilon"] = p.get("epsilon")  # the dataset's lifetime account (all studies)
        rec["epsilon_budget"] = p.get("budget")
        rec["took_part"] = rec["rounds_contributed"] > 0
        rec.setdefault("val_epsilon", None)
        rec.setdefault("val_epsilon_budget", None)
        rec["last_receipt"] = receipts.get(name)
    return [out[k] for k in sorted(out)]


def build_report(
    *, history: StudyHistory, run_dir: Path, study: StudyConfig | None = None, fab_hash: str | None = None
) -> dict[str, Any]:
    """The governance report of a finished (or stopped) study, as a JSON-ready mapping."""
    if study is None:
        study = parse_study(history.study, source=str(run_dir / "metrics.json"))
    pkg = package_hash()
    priv = study.privacy
    return {
        "report_version": REPORT_VERSION,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "study": {
            "name": study.federation.name,
            "study_id": history.study_id,
            "status": history.status,
            "config_fingerprint": study.fingerprint(),
            "rounds_planned": study.federation.rounds,
            "rounds_run": len(history.rounds),
            "model": study.model.name,
            "strategy": study.strategy.name,
            "min_hospitals": study.federation.min_hospitals,
        },
        "privacy": {"enabled": priv.enabled, "epsilon_budget": priv.epsilon if priv.enabled else None,
                    "delta": priv.delta if priv.enabled else None,
                    "max_grad_norm": priv.max_grad_norm if priv.enabled else None, "accountant": priv.accountant},
        "software": {
            "fedrad_version": _version("fedrad"),
            "fedrad_package_sha256": pkg["sha256"],
            "fedrad_package_files": pkg["files"],
            "app_bundle_sha256": fab_hash,
            "flwr_version": _version("flwr"),
            "torch_version": torch.__version__,
            "opacus_version": _version("opacus"),
        },
        "model": {**model_summary(run_dir / "model.pt"), "selection": dict(history.model_choice)},
        "hospitals": _hospitals(history),
        "global_test": history.final_test,
        "operating_threshold": dict(history.operating_threshold),
        "events": list(history.events),
    }


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    s, sw, m, p = report["study"], report["software"], report["model"], report["privacy"]
    lines = [
        f"# Governance report: {s['name']}",
        "",
        f"Generated {report['generated_at']}. Status: **{s['status']}** "
        f"({s['rounds_run']} of {s['rounds_planned']} rounds).",
        "",
        "## What ran",
        "",
        "| item | value |",
        "|---|---|",
        f"| study id | `{s['study_id']}` |",
        f"| configuration fingerprint (sha256) | `{s['config_fingerprint']}` |",
        f"| fedrad version | {_cell(sw['fedrad_version'])} |",
        f"| fedrad package sha256 ({sw['fedrad_package_files']} source files) | `{sw['fedrad_package_sha256']}` |",
        f"| app bundle sha256 | {f'`{fab}`' if (fab := sw['app_bundle_sha256']) else '- (simulation)'} |",
        f"| Flower / PyTorch / Opacus | {_cell(sw['flwr_version'])} / {_cell(sw['torch_version'])} / "
        f"{_cell(sw['opacus_version'])} |",
        f"| model | {s['model']} ({_cell(m.get('parameters'))} parameters), strategy {s['strategy']} |",
        f"| final model sha256 ({m['path']}) | {'`' + m['sha256'] + '`' if m.get('sha256') else '-'} |",
        f"| which model is {m['path']} | {_cell((m.get('selection') or {}).get('note'))} |",
        f"| differential privacy | {'on' if p['enabled'] else '**off**'}: budget epsilon {_cell(p['epsilon_budget'])}, "
        f"delta {_cell(p['delta'])}, clipping {_cell(p['max_grad_norm'])}, {p['accountant']} accountant |",
        "",
        "## Hospitals",
        "",
        "Epsilon per account, each of its own budget: this study's, the dataset's lifetime over every "
        "study (what the hospital's ledger enforces) and the validation account.",
        "",
        "| hospital | took part | rounds contributed | refused | failed | study epsilon / budget | "
        "lifetime epsilon / budget | validation epsilon / budget | last status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in report["hospitals"]:
        lines.append(f"| {_cell(h['name'])} | {'yes' if h['took_part'] else 'no'} | {h['rounds_contributed']} | "
                     f"{h['rounds_refused']} | {h['rounds_failed']} | "
                     f"{_cell(h.get('study_epsilon'))} / {_cell(h.get('study_epsilon_budget'))} | "
                     f"{_cell(h['epsilon'])} / {_cell(h['epsilon_budget'])} | "
                     f"{_cell(h.get('val_epsilon'))} / {_cell(h.get('val_epsilon_budget'))} | "
                     f"{_cell(h['last_status'])[:80]} |")
    anchored = [h for h in report["hospitals"] if h.get("last_receipt")]
    if anchored:
        lines += ["", "### Audit-log anchors (last receipt per hospital)", "",
                  "Each hospital's node can prove its audit log unchanged up to this entry: "
                  "`fedrad-node audit verify` must show this head at this entry count.", "",
                  "| hospital | audit entries | audit-log head | round | reply |", "|---|---|---|---|---|"]
        for h in anchored:
            r = h["last_receipt"]
            lines.append(f"| {_cell(h['name'])} | {_cell(r.get('audit_count'))} | `{_cell(r.get('audit_head'))}` | "
                         f"{_cell(r.get('round'))} | {_cell(r.get('kind'))} |")
    refusals = [(h["name"], r) for h in report["hospitals"] for r in h["refusals"]]
    if refusals:
        lines += ["", "### Refusals and failures", ""]
        lines += [f"- {_cell(name)}, round {r['round']}: {_cell(r['reason'])}" for name, r in refusals]
    g = report.get("global_test") or {}
    thr = report.get("operating_threshold") or {}
    thr_text = (f"{_cell(thr.get('value'))} (chosen on pooled validation of round {_cell(thr.get('round'))}, "
                f"{_cell(thr.get('rule'))})" if thr.get("value") is not None else "- (argmax)")
    if g:
        lines += ["", "## Final model on the coordinator's held-out test split", "",
                  f"AUC {_cell(g.get('auc'))}; at the operating threshold {thr_text}: sensitivity "
                  f"{_cell(g.get('sensitivity'))}, specificity {_cell(g.get('specificity'))}, accuracy "
                  f"{_cell(g.get('accuracy'))} ({_cell(g.get('num_examples'))} images)."]
    if report["events"]:
        lines += ["", "## Events", ""] + [f"- {_cell(e)}" for e in report["events"]]
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_report(
    *, history: StudyHistory, run_dir: Path, study: StudyConfig | None = None, fab_hash: str | None = None
) -> tuple[Path, Path]:
    """Write ``governance.json`` and ``governance.md`` into ``run_dir``; returns both paths."""
    report = build_report(history=history, run_dir=run_dir, study=study, fab_hash=fab_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = run_dir / JSON_NAME, run_dir / MARKDOWN_NAME
    write_json_atomic(jpath, report)
    _write_text_atomic(mpath, render_markdown(report))
    return jpath, mpath


def report_from_run_dir(run_dir: Path, *, fab_hash: str | None = None) -> tuple[Path, Path]:
    """(Re)write the report of a run folder from its ``metrics.json`` and ``model.pt``."""
    import json

    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        raise FederationError(f"{run_dir}: no metrics.json (not a study run folder)")
    data = json.loads(metrics.read_text(encoding="utf-8"))
    history = StudyHistory.resume(metrics, study=data["study"], study_id=data["study_id"], up_to_round=10**9)
    history.status = data.get("status", history.status)
    history.final_test = data.get("global_test") or {}
    return write_report(history=history, run_dir=run_dir, fab_hash=fab_hash)
