"""Study configuration: one YAML schema loaded into typed, frozen objects at one place.

Every problem in a file is collected and reported together; each names the file, the dotted
field and the bad value. Unknown keys are errors.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationConfig(_Frozen):
    name: str = "fedrad-study"
    num_hospitals: int = Field(3, ge=1, le=1000)
    rounds: int = Field(5, ge=1, le=10000)
    min_hospitals: int = Field(1, ge=1, description="fewest hospitals an aggregation may use")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    round_timeout_s: float = Field(3600.0, gt=0)
    seed: int = 42
    #: How a hospital's update travels: "float32" (the model's weights) or "float16-delta" (the
    #: difference from the global model it trained from, as float16: half the bytes; the coordinator
    #: adds it back. Post-processing of the DP output, so the guarantee is unchanged).
    update_encoding: Literal["float32", "float16-delta"] = "float32"
    #: Simulation only: CPU cores and GPU share per simulated hospital.
    client_cpus: float = Field(1.0, gt=0)
    client_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _min_le_total(self) -> "FederationConfig":
        if self.min_hospitals > self.num_hospitals:
            raise ValueError(
                f"min_hospitals ({self.min_hospitals}) exceeds num_hospitals ({self.num_hospitals})"
            )
        return self


class StrategyConfig(_Frozen):
    name: str = "fedavg"
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Frozen):
    name: str = "cnn"
    options: dict[str, Any] = Field(default_factory=dict)


class AugmentationConfig(_Frozen):
    """Per-sample augmentation (applied to each training image independently)."""

    hflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate_deg: float = Field(0.0, ge=0.0, le=180.0)
    shift: float = Field(0.0, ge=0.0, le=0.5, description="max shift as a fraction of size")
    zoom: float = Field(0.0, ge=0.0, le=0.5, description="max relative zoom in or out")
    brightness: float = Field(0.0, ge=0.0, le=1.0)
    contrast: float = Field(0.0, ge=0.0, le=1.0)

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in self.model_dump().values())


class PartitionConfig(_Frozen):
    scheme: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(1.0, gt=0.0, description="Dirichlet concentration (smaller = more skewed)")
    min_per_hospital: int = Field(16, ge=1)


class DataConfig(_Frozen):
    source: Literal["npz", "dicom"] = "npz"
    #: npz: a MedMNIST-style archive. None = the bundled PneumoniaMNIST.
    path: str | None = None
    #: dicom: one folder per hospital under this root (``<root>/<hospital-name>/``).
    image_size: int = Field(28, ge=8, le=1024)
    channels: int = Field(1, ge=1, le=3)
    class_names: tuple[str, ...] | None = None
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    #: Cap on training images per hospital (tests, quick demos). None = all.
    max_train_per_hospital: int | None = Field(None, ge=1)
    max_val_per_hospital: int | None = Field(None, ge=1)
    #: Cap on the server's held-out test images. None = all.
    max_test: int | None = Field(None, ge=1)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)


class PrivacyConfig(_Frozen):
    enabled: bool = True
    epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="per-hospital budget")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    #: None: calibrated so that the planned rounds exactly fit the budget.
    noise_multiplier: float | None = Field(None, ge=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    #: Give up (refuse) rather than train with more noise than this.
    max_noise_multiplier: float = Field(50.0, gt=0.0)
    #: Per-sample clipping engine. Opacus' own: "hooks", "ew", "functorch" (materialise per-sample
    #: gradients). fedrad's (:mod:`fedrad.client.training.dp_engine`): "ghost" (per-sample gradient norms from
    #: activations and output gradients, no per-sample gradients), "per-sample", and "mixed" (per
    #: layer, whichever of the two is cheaper; Bu et al. 2022). All give the same clipped gradients.
    grad_sample_mode: Literal["hooks", "ew", "functorch", "mixed", "ghost", "per-sample"] = "mixed"


class TrainingConfig(_Frozen):
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, description="expected (Poisson) batch size under DP")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    proximal_mu: float = Field(0.0, ge=0.0, description="FedProx term; 0 = off")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    #: DP-compatible class weighting: "balanced" scales each example's *clipped* gradient by its
    #: class weight (the rarest class 1, others min_count / count <= 1, from the node's noisy
    #: per-class counts, released once per dataset and charged to its ledger), so no example's
    #: contribution exceeds max_grad_norm and the accounting is unchanged. "none": unweighted.
    class_weighting: Literal["none", "balanced"] = "none"
    #: Augmentation multiplicity K (De et al. 2022): each Poisson-sampled example is augmented K
    #: times independently (the node's OS-entropy generator) and its gradient is the mean of its K
    #: views' gradients, taken *before* clipping: one example is still one unit for clipping, noise
    #: and accounting. Costs about K times the compute per step. 1 = one view; without
    #: ``data.augmentation`` the views would be identical, so the node trains with one.
    augmentation_multiplicity: int = Field(1, ge=1, le=32)


class OutputConfig(_Frozen):
    #: Where run folders go (relative to the YAML file's folder).
    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=1)


class SimulationConfig(_Frozen):
    #: Simulation only: a node-policy YAML every simulated hospital enforces (in deployment each
    #: hospital's own node configuration holds its policy; the coordinator never sets it).
    node_policy: str | None = None
    #: Simulation only, for tests and research: seed the hospitals' DP randomness (noise, Poisson
    #: sampling, augmentation) from ``federation.seed``, the node's round and the partition, so a
    #: run can be repeated exactly. Off (the default), every hospital draws it from OS entropy. A
    #: deployed node refuses a study that sets it (the coordinator could regenerate the noise).
    reproducible_randomness: bool = False


class SecureAggregationConfig(_Frozen):
    """Secure aggregation (Flower SecAgg+): the coordinator only sees the sum of the hospitals' updates.

    See :mod:`fedrad.server.secagg` for the protocol, the error bound and the checks."""

    enabled: bool = False
    #: Neighbours each hospital shares its secrets with (itself included); None = every hospital sampled.
    num_shares: int | None = Field(None, ge=3)
    #: Shares needed to reconstruct a secret (a strict majority of num_shares); None = num_shares // 2 + 1.
    reconstruction_threshold: int | None = Field(None, ge=2)
    #: Bound on each coordinate of a hospital's example-weighted update; larger ones are clipped.
    clipping_range: float = Field(1.0, gt=0.0)
    quantization_range: int = Field(2**22, ge=2)
    modulus_range: int = Field(2**32, ge=4, le=2**32)
    #: Example count that maps to weight 1: at least the largest hospital's training-set size.
    max_weight: float = Field(10_000.0, gt=0.0)


#: What a study gets for what it leaves out (issue 10: a study that sets only ``privacy.epsilon``
#: must train a useful model; measured in benchmarks/ISSUE10.md). Applied to the study as written
#: (YAML, dict), before validation; the section classes keep their neutral defaults (no
#: augmentation, no weighting) for code that builds them one by one.
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "federation": {"rounds": 10},
    "training": {"batch_size": 128, "class_weighting": "balanced"},
    # mild, label-preserving changes (no flips: laterality matters in radiographs)
    "data": {"augmentation": {"rotate_deg": 5.0, "shift": 0.05, "zoom": 0.05, "brightness": 0.05, "contrast": 0.05}},
}
#: The model a study gets when it names none, by its privacy budget: a fixed wavelet-scattering
#: front end (no trainable or data-dependent part) with a small CNN head, or, at low epsilon, with
#: a linear head and a smaller step size.
LOW_EPSILON = 2.0
DEFAULT_MODEL = "scatter-cnn"
LOW_EPSILON_MODEL = "scatter-linear"
#: Learning rates for models whose measured best differs from ``training.lr``'s default.
MODEL_LR: dict[str, float] = {"scatter-linear": 0.05}


def _budget_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in :data:`STUDY_DEFAULTS` and, when the study names no model, ``model`` (and
    ``training.lr`` for it) from the privacy budget; anything the study sets is kept as it is."""
    data = dict(data)
    for section, defaults in STUDY_DEFAULTS.items():
        given = data.get(section)
        if given is None:
            data[section] = dict(defaults)
        elif isinstance(given, dict):
            data[section] = {**defaults, **given}
    model = data.get("model")
    if model is not None and not (isinstance(model, dict) and "name" not in model):
        return data
    privacy = data.get("privacy")
    privacy = privacy.model_dump() if isinstance(privacy, BaseModel) else (privacy or {})
    enabled = privacy.get("enabled", True) if isinstance(privacy, dict) else True
    epsilon = privacy.get("epsilon", PrivacyConfig.model_fields["epsilon"].default) if isinstance(privacy, dict) else None
    low = bool(enabled) and isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon <= LOW_EPSILON
    name = LOW_EPSILON_MODEL if low else DEFAULT_MODEL
    out = dict(data)
    out["model"] = {**(model or {}), "name": name}
    training = out.get("training")
    if name in MODEL_LR and (training is None or (isinstance(training, dict) and "lr" not in training)):
        out["training"] = {**(training or {}), "lr": MODEL_LR[name]}
    return out


class StudyConfig(_Frozen):
    federation: FederationConfig = Field(default_factory=FederationConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_for_the_budget(cls, data: Any) -> Any:
        return _budget_defaults(data) if isinstance(data, dict) else data

    @field_validator("federation", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _engine_handles_the_model(self) -> "StudyConfig":
        if self.model.options.get("weight_standardization") and self.privacy.enabled \
                and self.privacy.grad_sample_mode == "ew":
            raise ValueError("model.options.weight_standardization needs privacy.grad_sample_mode "
                             "'mixed', 'ghost', 'per-sample' or 'hooks' (Opacus' 'ew' engine cannot "
                             "differentiate the standardised convolution per sample)")
        if self.training.augmentation_multiplicity > 1 and not self.data.augmentation.enabled:
            raise ValueError(f"training.augmentation_multiplicity: {self.training.augmentation_multiplicity} views "
                             "need data.augmentation (without it the views are identical)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        if not self.secure_aggregation.enabled:
            # Off: left out, so that studies without it keep their fingerprint (study id, ledger
            # entries, checkpoints) from before the block existed.
            d.pop("secure_aggregation")
        # training.class_weighting always stays: leaving out "none" would read back as the study
        # default ("balanced", STUDY_DEFAULTS), so a study must round-trip through its own dict.
        if self.training.augmentation_multiplicity == 1:
            d["training"].pop("augmentation_multiplicity")  # off: fingerprints from before the option stay
        if self.federation.update_encoding == "float32":
            d["federation"].pop("update_encoding")  # the default: fingerprints from before the option stay
        if not self.simulation.reproducible_randomness:
            d["simulation"].pop("reproducible_randomness")  # off: fingerprints from before the switch stay
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form (identifies a study's settings)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


#: Dotted fields of a study that are purely cosmetic or operational: they change neither what a
#: hospital computes on its data nor what it releases, so they are left out of :func:`study_key`
#: (a study renamed, re-timed or moved to another output folder is the *same* study to a node and
#: gets no fresh per-study budget). ``data.path`` / ``data.max_test``: the node's data is its own
#: (deployment: node.yaml; simulation: the ledger is bound to the data's fingerprint anyway) and
#: the test set is the coordinator's. ``simulation.node_policy``: a path to the node's own rules.
COSMETIC_FIELDS: tuple[str, ...] = (
    "federation.name",
    "federation.round_timeout_s",
    "federation.client_cpus",
    "federation.client_gpus",
    "output",
    "training.device",
    "training.num_threads",
    "training.eval_batch_size",
    # the per-sample clipping engine: every engine gives the same clipped, noised gradients
    "privacy.grad_sample_mode",
    "data.path",
    "data.max_test",
    "simulation.node_policy",
)


def study_key(study: StudyConfig) -> str:
    """sha256 (hex) of the study's canonical JSON without :data:`COSMETIC_FIELDS`: the identity a
    hospital node keeps its per-study record and budget under."""
    d = study.to_dict()
    for dotted in COSMETIC_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = d
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: The coordinator's aggregation strategies (fedrad.server.strategies.STRATEGIES holds the classes; a test
#: keeps the two in step). Listed here so a study's strategy is checked when it is loaded.
STRATEGY_NAMES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                                   "fedtrimmedavg", "krum")


def did_you_mean(word: str, known: Any) -> str:
    """``; did you mean 'x'?`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _keys_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``path`` (empty when it cannot be followed)."""
    for part in path:
        if model is None:
            return []
        field_info = model.model_fields.get(str(part))
        ann = field_info.annotation if field_info is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def format_validation_errors(source: str, err: ValidationError, *, model: type[BaseModel] | None = None) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(e["loc"][-1], _keys_at(model, tuple(e["loc"][:-1]))) if e["loc"] else ""
            problems.append(f"{source}: {loc}: unknown key (value {e.get('input')!r}){hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {loc}: {msg} (got {e.get('input')!r})")
    return problems


def parse_study(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> StudyConfig:
    """Validate a mapping into a :class:`StudyConfig`; relative data paths resolve against base_dir."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: <top level>: expected a mapping, got {type(data).__name__}"])
    problems = _registry_problems(data, source)  # reported together with every schema problem
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, format_validation_errors(source, err, model=StudyConfig) + problems) from None
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        updates: dict[str, Any] = {}
        if cfg.data.path is not None and not Path(cfg.data.path).is_absolute():
            updates["data"] = cfg.data.model_copy(update={"path": str((base_dir / cfg.data.path).resolve())})
        pol = cfg.simulation.node_policy
        if pol is not None and not Path(pol).is_absolute():
            updates["simulation"] = cfg.simulation.model_copy(update={"node_policy": str((base_dir / pol).resolve())})
        if not Path(cfg.output.dir).is_absolute():
            updates["output"] = cfg.output.model_copy(update={"dir": str((base_dir / cfg.output.dir).resolve())})
        if updates:
            cfg = cfg.model_copy(update=updates)
    _check_registries(cfg, source)
    return cfg


def _registry_problems(data: dict[str, Any], source: str) -> list[str]:
    """Names that refer to registries (model, strategy), checked on the raw mapping so they are reported
    in the same pass as every schema problem, each with the closest valid name."""
    from .models import MODELS  # local import: models import torch

    problems = []
    for section, known, default in (("model", sorted(MODELS), "cnn"), ("strategy", STRATEGY_NAMES, "fedavg")):
        sec = data.get(section)
        name = sec.get("name", default) if isinstance(sec, dict) else default
        if isinstance(name, str) and name not in known:
            problems.append(f"{source}: {section}.name: unknown {section} (got {name!r}; known: "
                            f"{', '.join(known)}){did_you_mean(name, known)}")
    return problems


def _check_registries(cfg: StudyConfig, source: str) -> None:
    """Checks that need the validated study (registry names are checked with the schema)."""
    problems = []
    if cfg.data.source == "dicom" and cfg.data.path is None:
        problems.append(f"{source}: data.path: required when data.source is 'dicom' (got None)")
    if problems:
        raise ConfigError(source, problems)


M = TypeVar("M", bound=BaseModel)


def read_yaml_mapping(path: str | Path, *, section: str | None = None) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (optionally the whole file is ``{section: {...}}``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [f"{p}: file not found"]) from None
    except OSError as exc:
        raise ConfigError(str(p), [f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [f"{p}: not valid YAML: {exc}"]) from None
    if section is not None and isinstance(data, dict) and set(data) == {section}:
        data = data[section]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), [f"{p}: <top level>: expected a mapping, got {type(data).__name__}"])
    return data


def load_yaml_model(path: str | Path, model: type[M], *, section: str | None = None) -> M:
    """Load a YAML file into a frozen model; every problem names the file, dotted field and value."""
    data = read_yaml_mapping(path, section=section)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(str(path), format_validation_errors(str(path), err, model=model)) from None


def load_study(path: str | Path) -> StudyConfig:
    """Load and validate a study YAML file."""
    p = Path(path)
    return parse_study(read_yaml_mapping(p), source=str(p), base_dir=p.parent.resolve())


def study_from_json(text: str) -> StudyConfig:
    """Rebuild a study from its canonical JSON form (as sent to hospitals)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("<message>", [f"<message>: study: not valid JSON: {exc}"]) from None
    return parse_study(data, source="<message>")
