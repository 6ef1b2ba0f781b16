"""Time one training step, DP-SGD (Opacus) versus plain SGD, per model, size, engine and device.

Not a test. Prints a table; usage::

    python benchmarks/dp_step.py [--device auto|cpu|cuda] [--steps 10] [--models cnn resnet18]

It runs the same code path a hospital runs (:func:`fedrad.client.training.train.train_local`), so it
also checks that ``device: auto`` uses the GPU where there is one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedrad.client.training.train import train_local
from fedrad.common.config import StudyConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.device import resolve_device
from fedrad.common.evaluation import evaluate
from fedrad.common.models import build_model, count_parameters


def time_steps(*, model_name: str, size: int, batch: int, steps: int, dp: bool, mode: str, device: torch.device) -> float:
    rng = np.random.default_rng(0)
    n = batch * steps
    split = ImageSplit(images=rng.random((n, 1, size, size), dtype=np.float32), labels=rng.integers(0, 2, n))
    base = StudyConfig()
    training = base.training.model_copy(update={"batch_size": batch, "local_epochs": 1})
    privacy = base.privacy.model_copy(update={"enabled": dp, "grad_sample_mode": mode})
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=size)
    warm = ImageSplit(images=split.images[: 2 * batch], labels=split.labels[: 2 * batch])
    train_local(model=model, split=warm, training=training, augmentation=base.data.augmentation, privacy=privacy,
                noise_multiplier=1.0 if dp else None, device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = train_local(model=model, split=split, training=training, augmentation=base.data.augmentation,
                        privacy=privacy, noise_multiplier=1.0 if dp else None, device=device, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / stats.steps * 1000
    evaluate(model, warm, device=device)  # exercises the evaluation path on the same device (untimed)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", nargs="*", default=["cnn", "resnet18"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[28, 64])
    ap.add_argument("--modes", nargs="*", default=["hooks", "ew"])
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"ms per training step, batch {args.batch}, on {name}, torch {torch.__version__}")
    for col in ("model", "params", "size", "engine", "plain SGD", "DP-SGD", "DP / plain"):
        table.add_column(col, justify="right")
    for m in args.models:
        params = count_parameters(build_model(m, in_channels=1, num_classes=2, image_size=28))
        for size in args.sizes:
            plain = time_steps(model_name=m, size=size, batch=args.batch, steps=args.steps, dp=False, mode="hooks",
                               device=device)
            for mode in args.modes:
                dp = time_steps(model_name=m, size=size, batch=args.batch, steps=args.steps, dp=True, mode=mode,
                                device=device)
                table.add_row(m, f"{params / 1e6:.2f}M", str(size), mode, f"{plain:.1f}", f"{dp:.1f}", f"{dp / plain:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
