"""Pick the compute device: the site's GPU when there is one, else the CPU (same code path)."""

from __future__ import annotations

import logging

import torch

from .errors import FedradError

log = logging.getLogger(__name__)


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if preference == "cuda":
        if not has_cuda:
            raise FedradError("training.device is 'cuda' but no CUDA GPU is visible (set device: auto or cpu)")
        return torch.device("cuda")
    if preference != "auto":
        raise FedradError(f"unknown device {preference!r} (auto, cpu, cuda)")
    return torch.device("cuda" if has_cuda else "cpu")
