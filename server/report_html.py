"""The study report a person opens: ``report.html`` (self-contained) and ``report.md``, from a run folder.

Built from what the run folder holds: ``metrics.json`` (required), ``config.yaml``,
``governance.json``, ``model.pt``, the hospitals' audit logs under ``sites/`` (simulation) and a
learning-rate figure when the run came from a sweep. Anything missing is shown as "not recorded":
``metrics.json``'s content changes between releases, so every field is read defensively.

Sections (HTML ids): ``study``, ``hospitals``, ``privacy``, ``training``, ``validation``,
``final-model``, ``learning-rate``, ``coordinator-saw``, ``events``. HTML images are embedded as
base64 PNG (no network access is needed to view it); the Markdown refers to the same PNGs written
into ``report-files/``. ``python -m fedrad.server.report_html RUN_DIR`` rebuilds both.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedrad.common.errors import FederationError

log = logging.getLogger(__name__)

HTML_NAME = "report.html"
MD_NAME = "report.md"
FILES_DIR = "report-files"
NR = "not recorded"
#: Metric names a hospital sends after evaluation (everything else it reports comes with training).
EVAL_NAMES = frozenset({"val_examples", "val_loss", "auc", "accuracy", "sensitivity", "specificity", "f1",
                        "confusion", "histograms", "val_epsilon", "val_epsilon_budget"})
#: What the coordinator records about a reply, not a statistic the hospital sent.
NOT_SENT = frozenset({"status", "receipt", "audit-head", "audit-count", "audit_head", "audit_count"})
LR_FIGURES = ("learning-rate.png", "lr.png", "lr-sweep.png", "sweep.png")


# -- a tiny document model rendered twice (HTML and Markdown) -----------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)


def fmt(v: Any, digits: int = 3) -> str:
    """A value for a table cell; None/NaN/missing read "not recorded"."""
    if v is None:
        return NR
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return NR if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# -- reading the run folder -----------------------------------------------------------------------
@dataclass
class RunFolder:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    governance: dict[str, Any]
    audits: dict[str, list[dict[str, Any]]]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics.get("rounds") or [] if isinstance(r, dict) and "round" in r]

    @property
    def study(self) -> dict[str, Any]:
        return self.metrics.get("study") or self.config or {}

    def hospitals(self) -> list[str]:
        names = {n for r in self.rounds for n in (r.get("hospitals") or {})}
        names |= set(self.audits)
        return sorted(names, key=lambda s: (len(s), s))


def read_run(run_dir: Path) -> RunFolder:
    metrics_path = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FederationError(f"{run_dir}: no metrics.json; is this a fedrad run folder?") from None
    except (OSError, ValueError) as exc:
        raise FederationError(f"{metrics_path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(metrics, dict):
        raise FederationError(f"{metrics_path}: not a fedrad metrics file")
    return RunFolder(run_dir, metrics, _read_yaml(run_dir / "config.yaml"), _read_json(run_dir / "governance.json"),
                     _read_audits(run_dir / "sites"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_audits(sites: Path) -> dict[str, list[dict[str, Any]]]:
    """Simulation: each hospital's audit log (what its node recorded sending), entry by entry."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not sites.is_dir():
        return out
    for log_path in sorted(sites.glob("*/audit.jsonl")):
        entries = []
        try:
            for line in log_path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if isinstance(e, dict):
                    entries.append(e)
        except OSError:
            continue
        out[log_path.parent.name] = entries
    return out


# -- figures ------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(run: RunFolder, key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in run.rounds:
        for name, h in (r.get("hospitals") or {}).items():
            v = h.get(key) if isinstance(h, dict) else None
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                xs, ys = out.setdefault(name, ([], []))
                xs.append(int(r["round"]))
                ys.append(float(v))
    return out


def _global(run: RunFolder, part: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in run.rounds:
        v = _get(r, part, key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            xs.append(int(r["round"]))
            ys.append(float(v))
    return xs, ys


def loss_figure(run: RunFolder) -> Figure | None:
    train, val = _series(run, "train_loss"), _series(run, "val_loss")
    test = _global(run, "global_test", "loss")
    if not (train or val or test[0]):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, (xs, ys) in sorted(train.items()):
        ax.plot(xs, ys, marker="o", lw=1, alpha=0.6, label=f"{name} training")
    for name, (xs, ys) in sorted(val.items()):
        ax.plot(xs, ys, ls="--", lw=1, alpha=0.6, label=f"{name} validation")
    if test[0]:
        ax.plot(*test, "k-", lw=2.5, label="global model, test split")
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Figure("loss.png", _png(fig), "Loss per round (what was recorded: per hospital and the global model's test loss).")


def validation_figure(run: RunFolder) -> Figure | None:
    keys = ("auc", "sensitivity", "specificity")
    if not any(_global(run, part, k)[0] for part in ("pooled_validation", "global_test") for k in keys):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharex=True)
    for ax, k in zip(axes, keys):
        for part, style, label in (("pooled_validation", "o-", "pooled validation"), ("global_test", "s--", "test split")):
            xs, ys = _global(run, part, k)
            if xs:
                ax.plot(xs, ys, style, label=label)
        for name, (xs, ys) in sorted(_series(run, k).items()):
            ax.plot(xs, ys, lw=0.8, alpha=0.5, label=name)
        ax.set_title(k)
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return Figure("validation.png", _png(fig), "AUC, sensitivity and specificity per round.")


def privacy_figure(rows: list[tuple[str, float | None, float | None, float | None, float | None]]) -> Figure | None:
    if not any(r[1] is not None for r in rows):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * len(rows)))
    y = np.arange(len(rows))
    ax.barh(y, [r[1] or 0.0 for r in rows], color="tab:blue", label="epsilon spent (lifetime)")
    for i, r in enumerate(rows):
        if r[2] is not None:
            ax.plot([r[2], r[2]], [i - 0.4, i + 0.4], "r-", lw=2, label="lifetime budget" if i == 0 else None)
        if r[3] is not None:
            ax.plot([r[3]], [i], "kd", label="study epsilon" if i == 0 else None)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel("epsilon")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return Figure("privacy.png", _png(fig), "Privacy spent per hospital against its budget.")


# -- the final model on the test split ----------------------------------------------------------
def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the exact ROC curve, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    p, n = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, np.cumsum(~y)[last] / n], np.r_[0.0, np.cumsum(y)[last] / p]


@dataclass
class FinalModel:
    threshold: float | None
    threshold_source: str
    class_names: tuple[str, ...]
    confusion: np.ndarray
    auc: float
    figure: Figure
    images: int


def final_model_on_test(run: RunFolder) -> tuple[FinalModel | None, str]:
    """Recompute the final model's ROC and confusion on the study's test split (npz studies only)."""
    model_path = run.path / "model.pt"
    if not model_path.exists():
        return None, "no model.pt in the run folder"
    data = run.study.get("data") or {}
    if data.get("source", "npz") != "npz":
        return None, "the coordinator holds no test split for a DICOM study"
    import torch

    from fedrad.common.datasets import load_npz, npz_source_path
    from fedrad.common.evaluation import predict_proba
    from fedrad.common.metrics import auc_from_scores, confusion_matrix
    from fedrad.common.model_card import read_model_card
    from fedrad.common.models import build_model

    try:
        ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
        card = read_model_card(ckpt)
        model = build_model(card.model_name, in_channels=card.channels, num_classes=card.num_classes,
                            image_size=card.image_size, options=card.model_options)
        model.load_state_dict(ckpt["state_dict"])
        test = load_npz(npz_source_path(data.get("path")), channels=card.channels, image_size=card.image_size)["test"]
    except Exception as exc:  # noqa: BLE001 - the report says why rather than failing
        return None, f"could not recompute ({type(exc).__name__}: {str(exc)[:160]})"
    max_test = data.get("max_test")
    if isinstance(max_test, int) and len(test) > max_test:  # the coordinator's own subset (server/study.py)
        rng = np.random.default_rng(int(_get(run.study, "federation", "seed") or 42))
        test = test.subset(rng.choice(len(test), size=max_test, replace=False))
    probs = predict_proba(model, test, device=torch.device("cpu"))
    labels = np.asarray(test.labels)
    c = probs.shape[1]
    if c == 2 and card.threshold is not None:
        decided = (probs[:, 1] >= card.threshold).astype(np.int64)
        auc = auc_from_scores(labels == 1, probs[:, 1])
    else:
        decided = probs.argmax(1)
        aucs = [auc_from_scores(labels == k, probs[:, k]) for k in range(c)]
        auc = float(np.nanmean(aucs))
    cm = confusion_matrix(labels, decided, c)
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    for k in ([1] if c == 2 else range(c)):
        fpr, tpr = roc_points(labels == k, probs[:, k])
        ax.plot(fpr, tpr, lw=2, label=f"{card.class_names[k]}")
    if c == 2 and card.threshold is not None:
        tp, fn, fp, tn = cm[1, 1], cm[1, 0], cm[0, 1], cm[0, 0]
        ax.plot([fp / max(fp + tn, 1)], [tp / max(tp + fn, 1)], "ko", label=f"threshold {card.threshold:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, test split (AUC {auc:.3f})")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    ax2.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax2.text(j, i, str(int(v)), ha="center", va="center", color="black" if v < cm.max() / 2 else "white")
    ax2.set_xticks(range(c), card.class_names)
    ax2.set_yticks(range(c), card.class_names)
    ax2.set_xlabel("decided")
    ax2.set_ylabel("true")
    ax2.set_title("confusion at the operating threshold")
    fig_ = Figure("final-model.png", _png(fig), "The final model on the test split: ROC curve and confusion matrix.")
    return FinalModel(card.threshold, card.threshold_source, card.class_names, cm, auc, fig_, len(labels)), ""


# -- sections -----------------------------------------------------------------------------------
def study_section(run: RunFolder) -> Section:
    s = Section("study", "Study")
    gov, st = run.governance, run.study
    rows = [
        ["name", fmt(_get(st, "federation", "name") or _get(gov, "study", "name"))],
        ["study id", fmt(run.metrics.get("study_id"))],
        ["status", fmt(run.metrics.get("status"))],
        ["rounds", f"{len(run.rounds)} run of {fmt(_get(st, 'federation', 'rounds'))} planned"],
        ["model", f"{fmt(_get(st, 'model', 'name'))} {json.dumps(_get(st, 'model', 'options') or {})}"],
        ["strategy", fmt(_get(st, "strategy", "name"))],
        ["data", f"{fmt(_get(st, 'data', 'source'))}, {fmt(_get(st, 'data', 'image_size'))} px, "
                 f"classes {', '.join(_get(st, 'data', 'class_names') or []) or NR}"],
        ["config fingerprint (sha256)", fmt(_get(gov, "study", "config_fingerprint"))],
        ["fedrad package (sha256)", fmt(_get(gov, "software", "fedrad_package_sha256"))],
        ["app bundle (sha256)", fmt(_get(gov, "software", "app_bundle_sha256") or "none (simulation)" if gov else None)],
        ["final model weights (sha256)", fmt(_get(gov, "model", "sha256"))],
        ["operating threshold", fmt(run.metrics.get("threshold", _get(run.metrics, "global_test", "threshold")))],
        ["Flower / torch / Opacus", " / ".join(fmt(_get(gov, "software", k)) for k in
                                             ("flwr_version", "torch_version", "opacus_version"))],
    ]
    for key in ("model_pt", "best_round", "best_model", "final_model", "model"):  # which model model.pt is
        if run.metrics.get(key) is not None:
            value = run.metrics[key]
            rows.append([key.replace("_", " "), fmt(value if not isinstance(value, (dict, list)) else json.dumps(value))])
    s.blocks.append(Table(["", ""], rows))
    return s


def hospitals_section(run: RunFolder) -> Section:
    s = Section("hospitals", "Hospitals")
    gov = {h.get("name"): h for h in run.governance.get("hospitals") or [] if isinstance(h, dict)}
    rows = []
    for name in run.hospitals():
        train = _series(run, "num_examples").get(name, ([], []))[1]
        val = _series(run, "val_examples").get(name, ([], []))[1]
        g = gov.get(name, {})
        statuses = [str((r.get("hospitals") or {}).get(name, {}).get("status", "")) for r in run.rounds]
        ok = sum(1 for x in statuses if x == "ok")
        rows.append([name, fmt(int(train[-1]) if train else g.get("train_examples")), fmt(int(val[-1]) if val else None),
                     f"{ok} of {len(run.rounds)}", fmt(g.get("last_status") or (statuses[-1] if statuses else None))])
    s.blocks.append("Training examples are the count each hospital reported (a DP-noised count where the "
                    "node releases one); validation examples are the evaluation replies' counts.")
    s.blocks.append(Table(["hospital", "training examples", "validation examples", "rounds contributed", "last status"], rows))
    return s


def privacy_section(run: RunFolder) -> Section:
    s = Section("privacy", "Privacy spent per hospital")
    rows, fig_rows = [], []
    for name in run.hospitals():
        last: dict[str, Any] = {}
        for r in run.rounds:
            h = (r.get("hospitals") or {}).get(name) or {}
            for k in ("epsilon", "epsilon_budget", "study_epsilon", "study_epsilon_budget", "val_epsilon", "delta",
                      "noise_multiplier"):
                if h.get(k) is not None:
                    last[k] = h[k]
        priv = (run.metrics.get("privacy") or {}).get(name) or {}
        eps = last.get("epsilon", priv.get("epsilon"))
        budget = last.get("epsilon_budget", priv.get("budget"))
        rows.append([name, fmt(eps), fmt(budget), fmt(last.get("study_epsilon")), fmt(last.get("study_epsilon_budget")),
                     fmt(last.get("val_epsilon")), fmt(last.get("delta"), 7), fmt(last.get("noise_multiplier"))])
        fig_rows.append((name, eps, budget, last.get("study_epsilon"), last.get("study_epsilon_budget")))
    s.blocks.append("Epsilon is cumulative, as each hospital's own privacy ledger reports it: the dataset's "
                    "lifetime account against its lifetime budget, and this study's own account against the "
                    "study's budget.")
    s.blocks.append(Table(["hospital", "lifetime epsilon", "lifetime budget", "study epsilon", "study budget",
                           "validation epsilon", "delta", "last noise multiplier"], rows))
    if (f := privacy_figure(fig_rows)) is not None:
        s.blocks.append(f)
    return s


def training_section(run: RunFolder) -> Section:
    s = Section("training", "Loss per round")
    f = loss_figure(run)
    s.blocks.append(f if f is not None else f"Loss: {NR}.")
    if not _series(run, "train_loss"):
        s.blocks.append(f"Per-hospital training loss: {NR} (it stays in each node's own log).")
    return s


def validation_section(run: RunFolder) -> Section:
    s = Section("validation", "AUC, sensitivity and specificity per round")
    rows = []
    for r in run.rounds:
        pv, gt = r.get("pooled_validation") or {}, r.get("global_test") or {}
        rows.append([str(r["round"]), *(fmt(pv.get(k)) for k in ("auc", "sensitivity", "specificity")),
                     *(fmt(gt.get(k)) for k in ("auc", "sensitivity", "specificity"))])
    s.blocks.append(Table(["round", "pooled val AUC", "pooled val sensitivity", "pooled val specificity",
                           "test AUC", "test sensitivity", "test specificity"], rows))
    f = validation_figure(run)
    s.blocks.append(f if f is not None else f"Per-round figures: {NR}.")
    return s


def final_model_section(run: RunFolder) -> Section:
    s = Section("final-model", "The final model on the test split")
    final, why = final_model_on_test(run)
    gt = run.metrics.get("global_test") or {}
    if final is None:
        s.blocks.append(f"ROC curve and confusion matrix: {NR} ({why}).")
        if gt:
            s.blocks.append(Table(["metric", "value"], [[k, fmt(v)] for k, v in gt.items()]))
        return s
    thr = "argmax" if final.threshold is None else f"{final.threshold:.3f} ({final.threshold_source})"
    s.blocks.append(f"{final.images} test images; operating threshold {thr}; AUC {final.auc:.3f}.")
    names = list(final.class_names)
    s.blocks.append(Table(["true \\ decided", *names],
                          [[names[i], *(str(int(v)) for v in final.confusion[i])] for i in range(len(names))]))
    s.blocks.append(final.figure)
    return s


def learning_rate_section(run: RunFolder) -> Section:
    s = Section("learning-rate", "Learning rate")
    for name in LR_FIGURES:
        p = run.path / name
        if p.is_file():
            s.blocks.append(Figure(name, p.read_bytes(), "The learning-rate sweep this run came from."))
            return s
    sweep = run.metrics.get("sweep") or run.metrics.get("learning_rate")
    if isinstance(sweep, (dict, list)):
        s.blocks.append("Sweep record: " + json.dumps(sweep)[:2000])
    else:
        s.blocks.append(f"Learning-rate figure: {NR} (the run did not come from a sweep).")
    return s


def coordinator_saw_section(run: RunFolder) -> Section:
    s = Section("coordinator-saw", "What the coordinator saw")
    s.blocks.append("Exactly which statistics left each hospital. Maps, predictions, images and per-example "
                    "outputs never leave a hospital.")
    rows = []
    for name in run.hospitals():
        entries = [e for e in run.audits.get(name, []) if e.get("outcome", "sent") == "sent"]
        if entries:
            for kind in sorted({str(e.get("kind")) for e in entries}):
                es = [e for e in entries if str(e.get("kind")) == kind]
                arrays = max((len(e.get("arrays") or []) for e in es), default=0)
                keys = sorted({k for e in es for k in (e.get("metrics") or {})})
                sent = sum(int(e.get("bytes_sent") or 0) for e in es)
                rows.append([name, kind, str(len(es)), f"{arrays} tensors" if arrays else "none",
                             ", ".join(keys) or "none", f"{sent:,}", "the hospital's audit log"])
            continue
        seen: dict[str, set[str]] = {"train": set(), "evaluate": set()}
        for r in run.rounds:
            h = (r.get("hospitals") or {}).get(name) or {}
            for k in h:
                if k not in NOT_SENT:
                    seen["evaluate" if k in EVAL_NAMES else "train"].add(k)
        for kind, keys in seen.items():
            if keys:
                rows.append([name, kind, NR, "model weights" if kind == "train" else "none", ", ".join(sorted(keys)),
                             NR, "the coordinator's records (metrics.json)"])
    s.blocks.append(Table(["hospital", "reply", "messages", "arrays", "statistics", "bytes sent", "source"], rows))
    receipts = [[name, head, count] for name in run.hospitals() for head, count in [_last_receipt(run, name)] if head]
    if receipts:
        s.blocks.append("Each reply carried the hospital's audit-log head (a receipt anchoring its audit log off "
                        "the node); the last one per hospital:")
        s.blocks.append(Table(["hospital", "audit head", "audit entries"], receipts))
    return s


def _last_receipt(run: RunFolder, name: str) -> tuple[str, str]:
    """The last audit-log receipt the coordinator recorded for ``name`` (governance, else metrics.json)."""
    for h in run.governance.get("hospitals") or []:
        if isinstance(h, dict) and h.get("name") == name:
            for key in ("last_receipt", "receipt"):
                r = h.get(key)
                if isinstance(r, dict) and (r.get("audit-head") or r.get("audit_head")):
                    return str(r.get("audit-head") or r.get("audit_head")), fmt(r.get("audit-count", r.get("audit_count")))
    for r in reversed(run.rounds):
        h = (r.get("hospitals") or {}).get(name) or {}
        rec = h.get("receipt") if isinstance(h.get("receipt"), dict) else h
        head = rec.get("audit-head") or rec.get("audit_head")
        if head:
            return str(head), fmt(rec.get("audit-count", rec.get("audit_count")))
    return "", ""


def events_section(run: RunFolder) -> Section:
    s = Section("events", "Events")
    events = [str(e) for e in run.metrics.get("events") or []]
    s.blocks.append(Table(["event"], [[e] for e in events]) if events else "No events were recorded.")
    return s


SECTIONS = (study_section, hospitals_section, privacy_section, training_section, validation_section,
            final_model_section, learning_rate_section, coordinator_saw_section, events_section)


def _safe(builder: Any, run: RunFolder) -> Section:
    try:
        return builder(run)
    except Exception as exc:  # noqa: BLE001 - one unreadable part must not lose the whole report
        log.warning("report section %s failed: %s", builder.__name__, exc)
        name = builder.__name__.removesuffix("_section")
        return Section(name.replace("_", "-"), name.replace("_", " ").title(),
                       [f"This section could not be built ({type(exc).__name__}); {NR}."])


# -- rendering ----------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1f24;line-height:1.45}h1{border-bottom:2px solid #2a6ebb}h2{margin-top:2em;color:#2a6ebb}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #c8ced6;padding:.25em .6em;
text-align:left}th{background:#eef3f9}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #e1e4e8}nav a{margin-right:1em}code{font-size:.9em}"""


def render_html(title: str, sections: Sequence[Section], generated: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
           f"<p>Generated {e(generated)} by fedrad from this run folder; self-contained (no network access).</p>",
           "<nav>" + "".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{s.id}">')
        out.append(f"<h2>{e(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                out.append("<table>")
                if any(b.header):
                    out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead>")
                out.append("<tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                                               for row in b.rows) + "</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{e(b)}</p>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def render_markdown(title: str, sections: Sequence[Section], generated: str) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    out = [f"# {title}", "", f"Generated {generated} by fedrad from this run folder.", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out.append("| " + " | ".join(cell(h) for h in b.header) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
            elif isinstance(b, Figure):
                out.append(f"![{b.caption}]({FILES_DIR}/{b.name})")
            else:
                out.append(b)
            out.append("")
    return "\n".join(out)


def build_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``report-files/*.png``) into ``run_dir``; returns both paths."""
    run = read_run(run_dir)
    sections = [_safe(b, run) for b in SECTIONS]
    title = f"fedrad study report: {_get(run.study, 'federation', 'name') or run_dir.name}"
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    html_path, md_path = run_dir / HTML_NAME, run_dir / MD_NAME
    files = run_dir / FILES_DIR
    files.mkdir(exist_ok=True)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                (files / b.name).write_bytes(b.png)
    _write(html_path, render_html(title, sections, generated))
    _write(md_path, render_markdown(title, sections, generated))
    log.info("wrote %s and %s", html_path, md_path)
    return html_path, md_path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

