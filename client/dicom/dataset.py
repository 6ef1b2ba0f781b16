"""Entry point: a hospital's DICOM folder -> :class:`fedrad.common.datasets.SiteData`.

``load_dicom_site(cfg)`` indexes the folder (:mod:`.index`), decodes and preprocesses new or
changed files into the pixel cache (:mod:`.cache`), drops files that could not be decoded
or failed the quality gate (each counted under its reason; images used with a fallback are
counted under their notes), splits by patient (:mod:`.splits`) and returns splits whose
images are read-only memmap slices of the cache (train rows, then val, then test).
A PHI-free ``load-report.json`` (counts only) is written next to the index.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrad.common.datasets import ImageSplit, SiteData
from fedrad.common.errors import DataError

from .cache import PixelCache
from .config import DicomDataConfig, SplitConfig
from .decode import Preprocess
from .index import DicomIndex, build_index, write_paths_file
from .splits import SPLITS, patient_splits

if TYPE_CHECKING:
    from fedrad.common.config import StudyConfig

log = logging.getLogger(__name__)

LOAD_REPORT = "load-report.json"


def load_dicom_site(cfg: DicomDataConfig, *, progress: bool = True) -> SiteData:
    """Index, decode (cached) and split a hospital's DICOM folder."""
    index = build_index(cfg, progress=progress)
    if not index.records:
        detail = "; ".join(index.summary_lines())
        raise DataError(f"{cfg.root}: no usable labelled DICOM images ({detail})")
    if len(index.class_names) < 2:
        raise DataError(f"{cfg.root}: need at least 2 classes, found {list(index.class_names)}")
    cache = PixelCache(cfg.cache_path, Preprocess.from_config(cfg), cfg.preprocess_hash())
    with cache.locked():
        update = cache.update([(r.sha256, cfg.root / r.path) for r in index.records], workers=cfg.workers, progress=progress)
        good = [r for r in index.records if r.sha256 not in update.failed]
        if not good:
            raise DataError(f"{cfg.root}: no DICOM image could be decoded ({_reasons(update.failed)})")
        s = cfg.split
        parts = patient_splits(
            [r.patient for r in good], [r.label_index for r in good], (s.train, s.val, s.test), seed=s.seed
        )
        order = np.concatenate([parts[name] for name in SPLITS])
        images = cache.arrange([good[i].sha256 for i in order])
    labels = np.asarray([good[i].label_index for i in order], dtype=np.int64)
    bounds = np.cumsum([0] + [len(parts[name]) for name in SPLITS])
    splits = {
        name: ImageSplit(images=images[bounds[k] : bounds[k + 1]], labels=labels[bounds[k] : bounds[k + 1]])
        for k, name in enumerate(SPLITS)
    }
    report = _load_report(index, update.failed, update.decoded, update.reused, parts, good)
    report["used_with_notes"] = dict(Counter(n for r in good for n in update.notes.get(r.sha256, ())))
    write_paths_file(index, cfg.cache_path, failed=update.failed, notes=update.notes)
    _write_json(cfg.cache_path / LOAD_REPORT, report)
    log.info(
        "DICOM site: %d train / %d val / %d test images; %d unusable after decoding",
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        len(update.failed),
    )
    return SiteData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"] if s.test > 0 else None,
        class_names=tuple(index.class_names),
        origin=f"DICOM ({len(good)} images, {report['patients']} patients)",
        extra={"report": report},
    )


def load_simulated_site(folder: Path, *, study: "StudyConfig") -> SiteData:
    """A simulated hospital's DICOM folder (``<data.path>/hospital-<k>`` with ``labels.csv``).

    Used by :func:`fedrad.client.runtime.site.simulated_site_data` when ``data.source`` is ``dicom``:
    80/20 train/val patient split seeded by the federation seed, cache in the folder.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: hospital DICOM folder not found")
    cfg = DicomDataConfig(
        root=folder,
        labels_csv=Path("labels.csv"),
        class_names=study.data.class_names,
        image_size=study.data.image_size,
        channels=3 if study.data.channels == 3 else 1,
        split=SplitConfig(train=0.8, val=0.2, test=0.0, seed=study.federation.seed),
    )
    return load_dicom_site(cfg, progress=False)


def _reasons(failed: dict[str, tuple[str, str]]) -> str:
    counts = Counter(reason for reason, _ in failed.values())
    return ", ".join(f"{r}: {n}" for r, n in counts.most_common())


def _load_report(
    index: DicomIndex,
    failed: dict[str, tuple[str, str]],
    decoded: int,
    reused: int,
    parts: dict[str, np.ndarray],
    good: list[Any],
) -> dict[str, Any]:
    """Counts only (no paths, identifiers or hashes)."""
    k = len(index.class_names)
    split_info = {}
    for name in SPLITS:
        idx = parts[name]
        split_info[name] = {
            "images": int(len(idx)),
            "patients": len({good[i].patient for i in idx}),
            "per_class": np.bincount([good[i].label_index for i in idx], minlength=k).astype(int).tolist(),
        }
    return {
        "index": index.summary(),
        "decoded_now": decoded,
        "reused_from_cache": reused,
        "unusable_after_decoding": dict(Counter(reason for reason, _ in failed.values())),
        "patients": len({r.patient for r in good}),
        "splits": split_info,
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, path)
