"""Run a study's final model on the hospital's own images, at the hospital (nothing leaves the node).

* :func:`load_model` reads ``model.pt``: weights and the model card (image size, channels, DICOM
  preprocessing, class names, operating threshold, weights sha256; see
  :mod:`fedrad.common.model_card`), refusing a file whose weights do not match its card.
* :func:`load_dicom_inputs` / :func:`load_npz_inputs` read the images with the training's
  preprocessing (DICOM: the node's own decoder and pixel cache, settings from the card or from
  the node's DICOM settings file); :func:`check_compatible` refuses a model whose input does not
  match the data (image size, channels, DICOM preprocessing hash) with a message saying what differs.
* :func:`run_predict` writes ``predictions.csv`` and, with labels, ``metrics.json`` and ``roc.png``.

Image identifiers in ``predictions.csv`` (column ``image_id``):

* DICOM, default (``paths="hashed"``): the 16-hex-digit salted sha256 of the file's path relative to
  ``--root``, salted with the node's own DICOM hash salt (``<cache>/hash-salt``, the salt the index
  uses), so the CSV names no file, yet the hospital (who holds the salt) can match rows to files;
  ``paths="plain"`` writes the relative path as it is.
* npz: ``<split>:<row index>`` in the archive.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedrad.common.datasets import ImageSplit, load_npz
from fedrad.common.errors import DataError, ModelError
from fedrad.common.evaluation import predict_proba
from fedrad.common.metrics import auc_from_scores, confusion_matrix, summarise
from fedrad.common.model_card import ModelCard, check_weights, read_model_card
from fedrad.common.models import build_model

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"
ROC = "roc.png"
SUMMARY = "predict-summary.json"
PathMode = Literal["hashed", "plain"]


@dataclass(frozen=True)
class PredictInputs:
    """Preprocessed images (float32 (N, C, H, W) in [0, 1]), their ids and, when known, labels."""

    images: np.ndarray
    ids: list[str]
    labels: np.ndarray | None
    source: str
    id_kind: str
    preprocess: dict[str, Any] | None = None
    preprocess_hash: str | None = None
    #: Files that could not be used, counted by reason (no names).
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


# -- the model ---------------------------------------------------------------------------------
def load_model(path: Path) -> tuple[nn.Module, ModelCard]:
    """The model in ``path`` (eval mode, CPU) and its card."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise ModelError(f"{path}: not a readable fedrad model file ({type(exc).__name__})") from None
    card = read_model_card(ckpt)
    state = ckpt["state_dict"]
    check_weights(card, state)
    model = build_model(card.model_name, in_channels=card.channels, num_classes=card.num_classes,
                        image_size=card.image_size, options=card.model_options)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: the weights do not fit the model its card describes ({str(exc)[:200]})") from None
    return model.eval(), card


# -- the data ----------------------------------------------------------------------------------
def load_npz_inputs(path: Path, *, card: ModelCard, split: str = "test") -> PredictInputs:
    """One split of a MedMNIST-style archive, converted as training converts it; labels from the archive."""
    splits = load_npz(path, channels=card.channels, image_size=card.image_size)
    if split not in splits:
        raise DataError(f"{path}: no split {split!r} (has {sorted(splits)})")
    s = splits[split]
    return PredictInputs(images=np.asarray(s.images), ids=[f"{split}:{i}" for i in range(len(s))],
                         labels=np.asarray(s.labels, dtype=np.int64), source=f"npz ({split} split)", id_kind="npz-index")


def dicom_config(root: Path, *, card: ModelCard, labels_csv: Path | None = None, settings_file: Path | None = None,
                 cache_dir: Path | None = None, workers: int | None = None) -> Any:
    """The node's DICOM settings for ``root``: its own settings file when given, else the card's preprocessing."""
    from fedrad.client.dicom.config import DicomDataConfig, SplitConfig, load_dicom_config

    fields: dict[str, Any] = {}
    if settings_file is not None:
        own = load_dicom_config(settings_file)
        fields = own.model_dump(exclude={"root", "labels_csv", "label_attribute", "split", "class_names"})
    else:
        fields = {"image_size": card.image_size, "channels": card.channels}
        pre = card.preprocess or {}
        if pre.get("window") is not None:
            fields["window"] = pre["window"]
        if pre.get("clip_percentiles") is not None:
            fields["clip_percentiles"] = tuple(pre["clip_percentiles"])
        if pre.get("frame_policy") is not None:
            fields["frame_policy"] = pre["frame_policy"]
    if cache_dir is not None:
        fields["cache_dir"] = cache_dir
    if workers is not None:
        fields["workers"] = workers
    cfg = DicomDataConfig(root=root, labels_csv=labels_csv or Path("labels.csv"), class_names=card.class_names,
                          split=SplitConfig(train=1.0, val=0.0, test=0.0), **fields)
    # Without labels no label source is needed: we never build a labelled index from this config.
    return cfg if labels_csv is not None else cfg.model_copy(update={"labels_csv": None})


def load_dicom_inputs(cfg: Any, *, paths: PathMode = "hashed", progress: bool = False) -> PredictInputs:
    """Decode (through the node's pixel cache) every usable DICOM image under ``cfg.root``.

    With a labels CSV, only labelled images (the index's records); without, every usable image.
    """
    from fedrad.client.dicom.cache import PixelCache
    from fedrad.client.dicom.decode import Preprocess
    from fedrad.client.dicom.identity import node_salt, salted_hash
    from fedrad.client.dicom.index import build_index, read_headers, walk
    from fedrad.client.dicom.parallel import map_chunks

    if not cfg.root.is_dir():
        raise DataError(f"{cfg.root}: DICOM folder not found")
    skipped: dict[str, int] = {}
    salt = node_salt(cfg.cache_path, cfg.hash_salt.get_secret_value() if cfg.hash_salt else None)
    if cfg.labels_csv is not None:
        index = build_index(cfg, progress=progress)
        files = [(r.path, r.sha256, r.label_index) for r in index.records]
        for s in index.skipped:
            skipped[s.reason] = skipped.get(s.reason, 0) + 1
    else:
        jobs = [(str(p), rel, salt, None) for p, rel in walk(cfg.root, [cfg.cache_path])]
        headers = [h for chunk in map_chunks(read_headers, jobs, workers=cfg.workers, description="reading DICOM headers",
                                             progress=progress) for h in chunk]
        files = []
        for h in sorted(headers, key=lambda h: h.path):
            if h.reason:
                skipped[h.reason] = skipped.get(h.reason, 0) + 1
            else:
                files.append((h.path, h.sha256, -1))
    if not files:
        raise DataError(f"{cfg.root}: no usable DICOM images ({_reasons(skipped) or 'the folder is empty'})")
    cache = PixelCache(cfg.cache_path, Preprocess.from_config(cfg), cfg.preprocess_hash())
    with cache.locked():
        update = cache.update([(sha, cfg.root / rel) for rel, sha, _ in files], workers=cfg.workers, progress=progress)
        good = [f for f in files if f[1] not in update.failed]
        for reason, _ in update.failed.values():
            skipped[reason] = skipped.get(reason, 0) + 1
        if not good:
            raise DataError(f"{cfg.root}: no DICOM image could be decoded ({_reasons(skipped)})")
        images = np.array(cache.arrange([sha for _, sha, _ in good]), dtype=np.float32)
    ids = [rel if paths == "plain" else salted_hash(salt, rel) for rel, _, _ in good]
    labels = np.asarray([k for _, _, k in good], dtype=np.int64) if cfg.labels_csv is not None else None
    log.info("DICOM: %d images to predict; %d files skipped", len(good), sum(skipped.values()))
    return PredictInputs(images=images, ids=ids, labels=labels, source="dicom",
                         id_kind="relative path" if paths == "plain" else "salted sha256 of the relative path",
                         preprocess=cfg.preprocess_settings(), preprocess_hash=cfg.preprocess_hash(), skipped=skipped)


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def check_compatible(card: ModelCard, inputs: PredictInputs) -> None:
    """Refuse data the model was not trained for; the message says what differs and how to fix it."""
    problems = []
    if inputs.image_size != card.image_size:
        problems.append(f"image size: model {card.image_size}, data {inputs.image_size}")
    if inputs.channels != card.channels:
        problems.append(f"channels: model {card.channels}, data {inputs.channels}")
    if inputs.source == "dicom" and card.preprocess_hash is not None and inputs.preprocess_hash != card.preprocess_hash:
        ours, theirs = inputs.preprocess or {}, card.preprocess or {}
        diff = [f"{k}: model {theirs.get(k)!r}, data {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                if ours.get(k) != theirs.get(k)]
        problems.append(f"DICOM preprocessing hash: model {card.preprocess_hash}, data {inputs.preprocess_hash}"
                        + (f" ({'; '.join(diff)})" if diff else ""))
    if problems:
        raise DataError("the model's preprocessing does not match the data, refusing to predict: "
                        + "; ".join(problems) + ". Use the settings the model card records (run without a "
                        "settings file, or make the node's DICOM settings match).")
    if card.data_source != inputs.source.split(" ")[0]:
        log.warning("the model was trained on %s data and is applied to %s data", card.data_source, inputs.source)
    if inputs.source == "dicom" and card.preprocess_hash is None:
        log.warning("the model card records no DICOM preprocessing; using the decoder's defaults at the card's "
                    "image size and channels")


# -- predicting --------------------------------------------------------------------------------
def decide(probs: np.ndarray, card: ModelCard) -> np.ndarray:
    """Class decisions: binary at the card's threshold (class 1 when p1 >= threshold), else argmax."""
    if probs.shape[1] == 2 and card.threshold is not None:
        return (probs[:, 1] >= card.threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def local_metrics(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, card: ModelCard) -> dict[str, Any]:
    """AUC (exact, from the scores), and sensitivity/specificity/accuracy/F1/confusion at the decisions."""
    c = probs.shape[1]
    cm = confusion_matrix(labels, decisions, c)
    if c == 2:
        auc = auc_from_scores(labels == 1, probs[:, 1])
    else:
        vals = [auc_from_scores(labels == k, probs[:, k]) for k in range(c)]
        vals = [v for v in vals if np.isfinite(v)]
        auc = float(np.mean(vals)) if vals else float("nan")
    s = summarise(cm, auc)
    return {
        "images": int(len(labels)),
        "class_names": list(card.class_names),
        "positive_class": card.class_names[1] if c == 2 else None,
        "threshold": card.threshold,
        "threshold_source": card.threshold_source,
        **{k: (v if np.isfinite(v) else None) for k, v in s.as_dict().items()},
        "confusion": cm.astype(int).tolist(),
        "confusion_layout": "rows = true class, columns = decided class",
    }


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the exact ROC curve; a point per distinct score, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    p, n = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, fp / n], np.r_[0.0, tp / p], np.r_[np.inf, s[last]]


def write_roc(path: Path, labels: np.ndarray, probs: np.ndarray, card: ModelCard, metrics: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    for k in classes:
        fpr, tpr, _ = roc_points(labels == k, probs[:, k])
        auc = auc_from_scores(labels == k, probs[:, k])
        ax.plot(fpr, tpr, lw=2, label=f"{card.class_names[k]} (AUC {auc:.3f})")
    if len(classes) == 1 and metrics.get("sensitivity") is not None and metrics.get("specificity") is not None:
        ax.plot([1 - metrics["specificity"]], [metrics["sensitivity"]], "ko",
                label=f"threshold {card.threshold:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC on {metrics['images']} local images")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class PredictResult:
    out_dir: Path
    images: int
    metrics: dict[str, Any] | None
    files: list[Path]


def run_predict(model: nn.Module, card: ModelCard, inputs: PredictInputs, out_dir: Path, *,
                device: torch.device | None = None, batch_size: int = 256) -> PredictResult:
    """Predict every input and write the outputs into ``out_dir`` (on this node only)."""
    check_compatible(card, inputs)
    device = device or torch.device("cpu")
    split = ImageSplit(images=inputs.images, labels=np.zeros(len(inputs), dtype=np.int64)
                       if inputs.labels is None else inputs.labels)
    probs = predict_proba(model, split, device=device, batch_size=batch_size)
    decisions = decide(probs, card)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [_write_csv(out_dir / PREDICTIONS, inputs, probs, decisions, card)]
    metrics = None
    if inputs.labels is not None:
        metrics = local_metrics(inputs.labels, probs, decisions, card)
        (out_dir / METRICS).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        files += [out_dir / METRICS, write_roc(out_dir / ROC, inputs.labels, probs, card, metrics)]
    summary = {"images": len(inputs), "source": inputs.source, "image_id": inputs.id_kind,
               "skipped_by_reason": inputs.skipped, "preprocess": inputs.preprocess,
               "preprocess_hash": inputs.preprocess_hash, "model_card": card.as_dict(),
               "note": "written on this node; nothing was sent anywhere"}
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    files.append(out_dir / SUMMARY)
    log.info("predicted %d images; outputs in %s", len(inputs), out_dir)
    return PredictResult(out_dir=out_dir, images=len(inputs), metrics=metrics, files=files)


def _write_csv(path: Path, inputs: PredictInputs, probs: np.ndarray, decisions: np.ndarray, card: ModelCard) -> Path:
    names = list(card.class_names)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", *[f"p_{n}" for n in names], "decision",
                    *(["true_label"] if inputs.labels is not None else [])])
        for i, image_id in enumerate(inputs.ids):
            row = [image_id, *[f"{p:.6f}" for p in probs[i]], names[int(decisions[i])]]
            if inputs.labels is not None:
                row.append(names[int(inputs.labels[i])])
            w.writerow(row)
    return path
