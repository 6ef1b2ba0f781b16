"""A hospital node's DICOM settings: one frozen, validated object.

In a YAML file, relative ``labels_csv`` and ``cache_dir`` resolve against ``root`` (the CLI's
``--labels`` and ``--cache-dir`` flags resolve against the current directory instead, like every
command-line path, and are passed on absolute). Exactly one label source is set: a labels CSV
(``labels_csv`` + ``label_key`` + ``label_column``) or a DICOM attribute (``label_attribute``, a
keyword such as ``"ImageComments"``; attributes that identify people, studies or times, such as
Patient*, names, dates, UIDs, IDs, accession numbers, institution or physician names, are
refused: see :mod:`.phi`).

Preprocessing (see :mod:`fedrad.client.dicom.decode`):

* ``window``: None = the first VOI window stored in the file (else its VOI LUT, else
  percentile clipping at ``clip_percentiles``); a :class:`Window` forces that center/width
  (in modality units, i.e. after rescale slope/intercept).
* ``frame_policy`` picks one frame of a multi-frame image: ``middle`` (default, frame
  ``n // 2``), ``first`` or ``last``.
* Images are padded to a square (centred, value 0 = black after MONOCHROME1 inversion),
  then resized to ``image_size`` with antialiasing and normalised to float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from fedrad.common.config import format_validation_errors
from fedrad.common.errors import ConfigError

LabelKey = Literal["path", "sop_instance_uid", "study_instance_uid", "patient_id"]
FramePolicy = Literal["middle", "first", "last"]

#: Bump when decoding/preprocessing changes in a way that changes cached pixels.
PREPROCESS_VERSION = 2


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Frozen):
    """A VOI window in modality units (after rescale), DICOM LINEAR function."""

    center: float
    width: float = Field(gt=0.0)


class SplitConfig(_Frozen):
    """Patient-level split fractions (of images, approximately) and seed; test may be 0."""

    train: float = Field(0.7, gt=0.0, le=1.0)
    val: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.15, ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1 (got {total:g})")
        return self


class DicomDataConfig(_Frozen):
    #: Folder of DICOM files (walked at any depth; any file names; DICOMDIR ignored).
    root: Path
    #: Labels spreadsheet (CSV, header row). Relative paths resolve against ``root``.
    labels_csv: Path | None = None
    #: What the CSV's key column holds.
    label_key: LabelKey = "path"
    #: Name of the key column; None = the ``label_key`` name itself (e.g. ``path``).
    key_column: str | None = None
    label_column: str = "label"
    #: Alternative to a CSV: take the label from this DICOM attribute (keyword).
    label_attribute: str | None = None
    #: Class names in class-index order; labels are matched by name (or by index).
    #: None = the sorted distinct label values found (every hospital must then see every class).
    class_names: tuple[str, ...] | None = None
    image_size: int = Field(28, ge=8, le=2048)
    channels: Literal[1, 3] = 1
    window: Window | None = None
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    frame_policy: FramePolicy = "middle"
    split: SplitConfig = Field(default_factory=SplitConfig)
    #: Index, reports and preprocessed cache. None = ``<root>/.fedrad-cache``.
    cache_dir: Path | None = None
    #: Salt for the hashes of patient IDs and UIDs. None = a random per-node salt kept in the cache dir.
    hash_salt: SecretStr | None = None
    #: Worker processes for indexing and decoding. None = all cores.
    workers: int | None = Field(None, ge=1, le=512)

    @field_validator("label_attribute")
    @classmethod
    def _not_identifying(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from .phi import identifying_reason

        if (why := identifying_reason(value)) is not None:
            raise ValueError(
                f"{why}; labels become class names that are printed, reported and sent to the coordinator, so "
                "identifying attributes are refused (to label by patient, study or instance, use a labels CSV "
                "with label_key patient_id, study_instance_uid or sop_instance_uid)"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> "DicomDataConfig":
        if (self.labels_csv is None) == (self.label_attribute is None):
            raise ValueError("set exactly one of labels_csv or label_attribute")
        lo, hi = self.clip_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100 (got {lo}, {hi})")
        if self.class_names is not None:
            if len(self.class_names) < 2:
                raise ValueError("class_names needs at least 2 classes")
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names has duplicates")
        return self

    # -- derived paths -------------------------------------------------------------------
    @property
    def labels_path(self) -> Path | None:
        if self.labels_csv is None:
            return None
        return self.labels_csv if self.labels_csv.is_absolute() else self.root / self.labels_csv

    @property
    def cache_path(self) -> Path:
        if self.cache_dir is None:
            return self.root / ".fedrad-cache"
        return self.cache_dir if self.cache_dir.is_absolute() else self.root / self.cache_dir

    @property
    def key_column_name(self) -> str:
        return self.key_column or self.label_key

    def preprocess_settings(self) -> dict[str, Any]:
        """Everything that changes the cached pixels of a file (and nothing else)."""
        return {
            "version": PREPROCESS_VERSION,
            "image_size": self.image_size,
            "channels": self.channels,
            "window": None if self.window is None else self.window.model_dump(),
            "clip_percentiles": list(self.clip_percentiles),
            "frame_policy": self.frame_policy,
        }

    def preprocess_hash(self) -> str:
        text = json.dumps(self.preprocess_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_dicom_config(
    data: Any, *, source: str = "<dicom config>", base_dir: Path | None = None
) -> DicomDataConfig:
    """Validate a mapping; every problem is reported at once as a :class:`ConfigError`.

    A relative ``root`` resolves against ``base_dir`` (the YAML file's folder) when given.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: <top level>: expected a mapping, got {type(data).__name__}"])
    try:
        cfg = DicomDataConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, format_validation_errors(source, err)) from None
    if base_dir is not None and not cfg.root.is_absolute():
        cfg = cfg.model_copy(update={"root": (base_dir / cfg.root).resolve()})
    return cfg


def load_dicom_config(path: str | Path) -> DicomDataConfig:
    """Load a YAML file holding :class:`DicomDataConfig` fields (optionally under a ``dicom:`` key)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), [f"{p}: file not found"]) from None
    except OSError as exc:
        raise ConfigError(str(p), [f"{p}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [f"{p}: not valid YAML: {exc}"]) from None
    if isinstance(data, dict) and set(data) == {"dicom"}:
        data = data["dicom"]
    return parse_dicom_config(data, source=str(p), base_dir=p.parent)
