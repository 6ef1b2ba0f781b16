"""The model card: everything inference needs, stored in ``model.pt`` beside the weights.

A hospital that runs the final model on its own images must use the preprocessing the training
used and the operating threshold the study chose; it never has to guess them. The card records:

* the model (registry name and options), number of classes and class names;
* the input: image size, channels, data source and, for DICOM, the preprocessing settings and
  their hash (``DicomDataConfig.preprocess_settings()`` / ``preprocess_hash()``; passed in as
  arguments because ``common`` never imports ``client``);
* the operating threshold (binary studies: class 1 is positive when ``p1 >= threshold``) and
  where it came from;
* the sha256 of the weights (same algorithm as the governance report's model hash).

:func:`read_model_card` also reads ``model.pt`` files written before the card existed: it fills
what it can from the saved ``study`` and ``class_names`` and uses a threshold of 0.5 (with a
warning).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModelError

log = logging.getLogger(__name__)

CARD_VERSION = 1
CARD_KEY = "model_card"
DEFAULT_THRESHOLD = 0.5
THRESHOLD_DEFAULT_SOURCE = "default 0.5 (the model file records no operating threshold)"


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors (name, dtype, shape and raw bytes of each, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """What inference needs; built by :func:`read_model_card`."""

    model_name: str
    model_options: dict[str, Any]
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    data_source: str
    #: Binary: p(class 1) >= threshold means class 1. None for more than two classes (argmax).
    threshold: float | None
    threshold_source: str
    weights_sha256: str | None
    #: DICOM preprocessing settings the training used (None when not recorded).
    preprocess: dict[str, Any] | None = None
    preprocess_hash: str | None = None
    study_name: str = ""
    study_id: str | None = None
    #: True when the card was reconstructed from an older model file.
    legacy: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": CARD_VERSION,
            "model": {"name": self.model_name, "options": dict(self.model_options)},
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "input": {"image_size": self.image_size, "channels": self.channels},
            "data": {"source": self.data_source, "preprocess": self.preprocess, "preprocess_hash": self.preprocess_hash},
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "weights_sha256": self.weights_sha256,
            "study": {"name": self.study_name, "id": self.study_id},
        }


def model_card(
    *,
    study_dict: dict[str, Any],
    class_names: list[str] | tuple[str, ...],
    threshold: float | None,
    state_dict: dict[str, torch.Tensor] | None = None,
    threshold_source: str = "pooled validation, Youden's J",
    preprocess_settings: dict[str, Any] | None = None,
    preprocess_hash: str | None = None,
    study_id: str | None = None,
) -> dict[str, Any]:
    """The card (a plain dict, saved under ``model.pt[CARD_KEY]``); fails hard on an inconsistent input."""
    names = tuple(str(c) for c in class_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ModelError(f"model card: class names must be >= 2 distinct names (got {list(names)})")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ModelError(f"model card: threshold must be in [0, 1] (got {threshold})")
    if (preprocess_settings is None) != (preprocess_hash is None):
        raise ModelError("model card: give both preprocess_settings and preprocess_hash, or neither")
    if len(names) > 2:
        thr, source = None, "argmax (more than two classes)"
    elif threshold is None:
        thr, source = DEFAULT_THRESHOLD, THRESHOLD_DEFAULT_SOURCE
    else:
        thr, source = float(threshold), threshold_source
    card = _card_from_study(study_dict, names)
    card = ModelCard(
        **{**card.__dict__, "threshold": thr, "threshold_source": source,
           "weights_sha256": state_dict_sha256(state_dict) if state_dict is not None else None,
           "preprocess": dict(preprocess_settings) if preprocess_settings is not None else None,
           "preprocess_hash": preprocess_hash, "study_id": study_id, "legacy": False},
    )
    return card.as_dict()


def _card_from_study(study: dict[str, Any], class_names: tuple[str, ...]) -> ModelCard:
    try:
        model = study.get("model") or {}
        data = study.get("data") or {}
        return ModelCard(
            model_name=str(model.get("name", "cnn")),
            model_options=dict(model.get("options") or {}),
            class_names=class_names,
            image_size=int(data.get("image_size", 28)),
            channels=int(data.get("channels", 1)),
            data_source=str(data.get("source", "npz")),
            threshold=None,
            threshold_source="",
            weights_sha256=None,
            study_name=str((study.get("federation") or {}).get("name", "")),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelError(f"model file: the saved study is malformed ({exc})") from None


def read_model_card(checkpoint: dict[str, Any]) -> ModelCard:
    """The card of a loaded ``model.pt`` (a dict); reconstructs one for model files without a card."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelError("not a fedrad model file (no state_dict)")
    raw = checkpoint.get(CARD_KEY)
    if isinstance(raw, dict):
        return _parse_card(raw)
    study = checkpoint.get("study")
    names = checkpoint.get("class_names") or ((study or {}).get("data") or {}).get("class_names")
    if not isinstance(study, dict) or not names:
        raise ModelError("model file holds neither a model card nor the study and class names that built it")
    base = _card_from_study(study, tuple(str(c) for c in names))
    threshold = checkpoint.get("threshold")
    notes: list[str] = ["model card reconstructed from the saved study (older model file)"]
    if base.num_classes > 2:
        thr, source = None, "argmax (more than two classes)"
    elif isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0:
        thr, source = float(threshold), "model file 'threshold'"
    else:
        thr, source = DEFAULT_THRESHOLD, THRESHOLD_DEFAULT_SOURCE
        log.warning("the model file records no operating threshold; using %.2f", DEFAULT_THRESHOLD)
        notes.append(source)
    return ModelCard(**{**base.__dict__, "threshold": thr, "threshold_source": source,
                        "weights_sha256": None, "legacy": True, "notes": tuple(notes)})


def _parse_card(raw: dict[str, Any]) -> ModelCard:
    try:
        if int(raw.get("version", 0)) > CARD_VERSION:
            raise ModelError(f"model card version {raw.get('version')} is newer than this fedrad understands "
                             f"({CARD_VERSION}); upgrade fedrad")
        data = raw.get("data") or {}
        thr = raw.get("threshold")
        return ModelCard(
            model_name=str(raw["model"]["name"]),
            model_options=dict(raw["model"].get("options") or {}),
            class_names=tuple(str(c) for c in raw["class_names"]),
            image_size=int(raw["input"]["image_size"]),
            channels=int(raw["input"]["channels"]),
            data_source=str(data.get("source", "npz")),
            threshold=None if thr is None else float(thr),
            threshold_source=str(raw.get("threshold_source", "")),
            weights_sha256=raw.get("weights_sha256"),
            preprocess=data.get("preprocess"),
            preprocess_hash=data.get("preprocess_hash"),
            study_name=str((raw.get("study") or {}).get("name", "")),
            study_id=(raw.get("study") or {}).get("id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model file: malformed model card ({type(exc).__name__}: {exc})") from None


def check_weights(card: ModelCard, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose sha256 differs from the card's (a tampered or mixed-up model file)."""
    if card.weights_sha256 is None:
        return
    got = state_dict_sha256(state_dict)
    if got != card.weights_sha256:
        raise ModelError(f"model file: the weights' sha256 {got[:16]}... does not match the model card's "
                         f"{card.weights_sha256[:16]}...; the file was altered or assembled from different runs")
