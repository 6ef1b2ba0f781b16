"""Whether a run folder may be resumed with a given study, decided before anything is written.

A run folder's identity is its study without the *operational* fields: where outputs go, how
often checkpoints are kept and how the coordinator's machine runs the simulation. Those may
differ between the first start and a resume (``fedrad simulate`` without ``--config`` picks an
output folder, a resume names it with ``--out``) without making it another study. Everything
else (data, model, privacy, training, federation shape) must match exactly: the hospitals'
ledgers count the resumed rounds as the same study.

The study id sent to hospitals stays the one the run started with (it is recorded in the run's
checkpoints and ``metrics.json``), so a resume never opens a new per-study account on a node.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from fedrad.common.config import StudyConfig, load_study
from fedrad.common.errors import FederationError

from .checkpoints import latest_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

#: Dotted study fields that do not change what is studied (see the module docstring).
OPERATIONAL_FIELDS: tuple[str, ...] = (
    "output.dir",
    "output.checkpoint_every",
    "federation.round_timeout_s",
    "federation.client_cpus",
    "federation.client_gpus",
)
#: The study file a run folder keeps (written once the run is accepted).
CONFIG_NAME = "config.yaml"


def study_identity(study: dict[str, Any]) -> dict[str, Any]:
    """``study`` (a :meth:`StudyConfig.to_dict` mapping) without its operational fields."""
    out = copy.deepcopy(study)
    for dotted in OPERATIONAL_FIELDS:
        section, _, key = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def differing_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two study mappings (sorted)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_fields(va, vb, prefix=f"{name}.")
        elif json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            out.append(name)
    return out


def is_run_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an earlier run (its config, checkpoints or metrics)."""
    return any((run_dir / name).exists() for name in (CONFIG_NAME, "metrics.json", "checkpoints"))


def recorded_study(run_dir: Path) -> tuple[dict[str, Any], str | None] | None:
    """The study (and its id, when recorded) of ``run_dir``'s latest checkpoint; None without one."""
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return None
    ckpt = load_checkpoint(latest[1])
    study = ckpt.get("study")
    if not isinstance(study, dict):
        raise FederationError(f"{latest[1]}: not a fedrad checkpoint (no study recorded)")
    sid = ckpt.get("study_id")
    return study, str(sid) if isinstance(sid, str) else None


def check_resumable(study: StudyConfig, run_dir: Path) -> str | None:
    """Raise :class:`FederationError` if ``run_dir`` holds checkpoints of another study.

    Returns the study id to keep using (the recorded one) when resuming, None for a new run.
    Reads only; writes nothing."""
    rec = recorded_study(run_dir)
    if rec is None:
        return None
    recorded, sid = rec
    diff = differing_fields(study_identity(recorded), study_identity(study.to_dict()))
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise FederationError(f"{run_dir}: holds checkpoints of a different study (differs in {shown}); "
                              "resume with the run's own settings (omit --config) or use a new --out folder")
    if sid is None:
        sid = _metrics_study_id(run_dir)
    if sid is None:  # checkpoints written before the id was recorded: the id was the fingerprint
        from fedrad.common.config import parse_study

        sid = parse_study(recorded, source=str(run_dir / "checkpoints")).fingerprint()[:16]
    return sid


def _metrics_study_id(run_dir: Path) -> str | None:
    """The study id ``metrics.json`` recorded (runners that do not put it into checkpoints)."""
    try:
        sid = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("study_id")
    except (OSError, ValueError, AttributeError):
        return None
    return sid if isinstance(sid, str) and sid else None


def study_for_resume(run_dir: Path) -> StudyConfig | None:
    """The study a run folder was started with (its ``config.yaml``), or None if it has none."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    return load_study(path)


def accept_run(study: StudyConfig, run_dir: Path, *, rewrite_config: bool = False) -> str | None:
    """Check that ``study`` may run in ``run_dir`` (:func:`check_resumable`), then create the folder
    and write its ``config.yaml`` (a new run; a resume only when it has none or ``rewrite_config``).

    Nothing is written when the check fails. Returns the recorded study id when resuming."""
    import yaml

    resumed_id = check_resumable(study, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / CONFIG_NAME
    if resumed_id is None or rewrite_config or not config_file.exists():
        config_file.write_text(yaml.safe_dump(study.to_dict(), sort_keys=False), encoding="utf-8")
    return resumed_id
