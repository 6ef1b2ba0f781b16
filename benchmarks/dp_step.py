"""Time one training step through ``train_local`` (the hospital's code path), DP engines side by side.

Not a test. Prints a table; usage::

    python benchmarks/dp_step.py [--cases cnn-demo:64:64 cnn:64:64 resnet18:128:32]
        [--engines plain ew mixed ghost opacus-ew plain-aug mixed-aug mixed-k4]
        [--rounds 3] [--steps 3] [--allocators glibc jemalloc] [--device cpu]

Engines (each a ``train_local`` call of ``--steps`` steps on a fixed batch, full-batch: sample
rate 1, so every step has exactly ``batch`` examples; time per step includes the call's set-up,
amortised over the steps):

- ``plain``: no DP; ``ew`` / ``hooks``: Opacus' engines; ``mixed`` / ``ghost`` / ``per-sample``:
  fedrad's engine (:mod:`fedrad.client.training.dp_engine`);
- ``opacus-ew``: raw Opacus ``ew`` + ``DPOptimizer`` steps outside ``train_local`` (reference);
- ``plain-aug`` / ``mixed-aug``: with the benchmark configs' augmentation, K = 1;
  ``mixed-k4``: the same with augmentation multiplicity K = 4 (each example 4 augmented views).

Engines run round-robin (``--rounds`` rounds) and the median round is reported, so load on a
shared machine slows all of them alike; ratios are against ``plain`` of the same run.

``--allocators glibc jemalloc`` runs the whole measurement once per allocator in a child process
(jemalloc by ``LD_PRELOAD``, see :data:`JEMALLOC`), alternating, and prints one table each plus
jemalloc's time relative to glibc per engine (across processes: less load-proof than the ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from fedrad.client.training.train import train_local
from fedrad.common.config import AugmentationConfig, PrivacyConfig, TrainingConfig
from fedrad.common.datasets import ImageSplit
from fedrad.common.device import resolve_device
from fedrad.common.models import build_model, count_parameters

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
#: The benchmark configs' augmentation (benchmarks/configs/*.yaml).
AUG = AugmentationConfig(rotate_deg=5, shift=0.05, zoom=0.05, brightness=0.05, contrast=0.05)
#: case name -> (registered model, options)
MODELS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "cnn-demo": ("cnn", {"widths": [8, 16, 32], "dense": 32}),  # the demo's / benchmark configs' CNN
    "cnn": ("cnn", None),  # the registry default, widths 32/64/128, dense 128
    "resnet18": ("resnet18", None),  # ResNet-18 with GroupNorm
}
ENGINE_MODES = {"ew", "hooks", "functorch", "mixed", "ghost", "per-sample"}
Step = Callable[[], None]


def allocator() -> str:
    text = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return next((n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in text), "glibc")


def _train_call(engine: str, model: torch.nn.Module, split: ImageSplit, *, batch: int, steps: int,
                device: torch.device) -> Step:
    views = 4 if engine.endswith("-k4") else 1
    aug = AUG if engine.endswith(("-aug", "-k4")) else AugmentationConfig()
    mode = engine.removesuffix("-aug").removesuffix("-k4")
    dp = mode != "plain"
    training = TrainingConfig(batch_size=batch, local_epochs=1 if dp else steps, lr=0.01, momentum=0.9,
                              augmentation_multiplicity=views)
    privacy = PrivacyConfig(enabled=dp, grad_sample_mode=mode if dp else "ew")  # type: ignore[arg-type]
    if dp and mode not in ENGINE_MODES:
        raise SystemExit(f"unknown engine {engine!r}")

    def call() -> None:
        train_local(model=model, split=split, training=training, augmentation=aug, privacy=privacy,
                    noise_multiplier=1.0 if dp else None, device=device,
                    sample_rate=1.0 if dp else None, steps=steps if dp else None,
                    expected_batch_size=float(batch) if dp else None)
    return call


def _opacus_ew(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int) -> Step:
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    gsm = prepare_module(model, grad_sample_mode="ew", wrap_model=True, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=len(y), generator=torch.Generator())

    def call() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            opt.step()
    return call


def time_case(case: str, *, engines: list[str], rounds: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median ms per step of each engine, round-robin."""
    name, size, batch = case.split(":")
    model_name, options = MODELS[name]
    s, b = int(size), int(batch)
    rng = np.random.default_rng(0)
    split = ImageSplit(images=rng.random((b, 1, s, s), dtype=np.float32), labels=rng.integers(0, 2, b))
    torch.manual_seed(0)
    base = build_model(model_name, in_channels=1, num_classes=2, image_size=s, options=options)
    calls: dict[str, Step] = {}
    for e in engines:
        m = copy.deepcopy(base)
        if e == "opacus-ew":
            x, y = torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)
            calls[e] = _opacus_ew(m.to(device).train(), x, y, steps=steps)
        else:
            calls[e] = _train_call(e, m, split, batch=b, steps=steps, device=device)
        calls[e]()  # warm-up (allocator pools, kernel selection)
    times: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(rounds):
        for e in engines:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            calls[e]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[e].append((time.perf_counter() - t0) / steps * 1000)
    return {e: statistics.median(v) for e, v in times.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    return {
        "allocator": allocator(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
        "cases": {c: time_case(c, engines=args.engines, rounds=args.rounds, steps=args.steps, device=device)
                  for c in args.cases},
    }


def table(result: dict[str, Any], engines: list[str], rounds: int, steps: int) -> Table:
    t = Table(title=f"ms per step (ratio to plain), {result['device']} {result['threads']} threads, "
                    f"{result['allocator']} malloc, torch {torch.__version__}; median of {rounds} rounds x "
                    f"{steps} steps")
    for col in ("case", "params", *engines):
        t.add_column(col, justify="right")
    for case, ms in result["cases"].items():
        name = case.split(":")[0]
        model_name, options = MODELS[name]
        params = count_parameters(build_model(model_name, in_channels=1, num_classes=2,
                                              image_size=int(case.split(":")[1]), options=options))
        base = ms.get("plain")
        cells = [f"{ms[e]:.0f}" + (f" ({ms[e] / base:.2f}x)" if base and e != "plain" else "") for e in engines]
        t.add_row(case, f"{params / 1e6:.2f}M", *cells)
    return t


def _child(args: argparse.Namespace, alloc: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if alloc == "jemalloc":
        if not Path(JEMALLOC).exists():
            raise SystemExit(f"{JEMALLOC} not found (Debian/Ubuntu: apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = JEMALLOC
    cmd = [sys.executable, __file__, "--json", "--device", args.device, "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--cases", *args.cases, "--engines", *args.engines]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=["cnn-demo:64:64", "cnn:64:64", "resnet18:128:32"],
                    help="name:image_size:batch, name one of " + ", ".join(MODELS))
    ap.add_argument("--engines", nargs="*",
                    default=["plain", "ew", "mixed", "ghost", "opacus-ew", "plain-aug", "mixed-aug", "mixed-k4"])
    ap.add_argument("--allocators", nargs="*", default=None, help="glibc and/or jemalloc (child processes)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (for --allocators)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.json or not args.allocators:
        result = measure(args)
        if args.json:
            print(json.dumps(result))
        else:
            Console(width=250).print(table(result, args.engines, args.rounds, args.steps))
        return 0
    console = Console(width=250)
    results: dict[str, dict[str, Any]] = {}
    for case in args.cases:  # alternate allocators case by case, so load drift hits both alike
        for alloc in args.allocators:
            r = _child(argparse.Namespace(**{**vars(args), "cases": [case]}), alloc)
            print(json.dumps(r), file=sys.stderr, flush=True)  # partial results survive an interrupted run
            results.setdefault(alloc, {**r, "cases": {}})["cases"].update(r["cases"])
    for alloc, r in results.items():
        console.print(table(r, args.engines, args.rounds, args.steps))
    if {"glibc", "jemalloc"} <= set(results):
        t = Table(title="jemalloc ms / glibc ms per engine (separate processes, alternated per case)")
        for col in ("case", *args.engines):
            t.add_column(col, justify="right")
        for case in args.cases:
            g, j = results["glibc"]["cases"][case], results["jemalloc"]["cases"][case]
            t.add_row(case, *[f"{j[e] / g[e]:.2f}" for e in args.engines])
        console.print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
