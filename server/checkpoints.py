"""Per-round checkpoints and the final model (weights + the config that built them)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

CKPT_RE = re.compile(r"round-(\d{4,})\.pt$")


def save_checkpoint(path: Path, *, state_dict: dict[str, torch.Tensor], study: dict[str, Any], round: int,
                    class_names: list[str], extra: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state_dict, "study": study, "round": round, "class_names": class_names,
                **(extra or {})}, tmp)
    os.replace(tmp, path)


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    best: tuple[int, Path] | None = None
    if folder.is_dir():
        for p in folder.iterdir():
            m = CKPT_RE.search(p.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
    return best


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
