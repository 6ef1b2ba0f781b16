"""Time one DP-SGD step per engine against a plain SGD step, same model, same batch, same run.

Not a test. Prints a table; usage::

    python benchmarks/dp_engine.py [--steps 3] [--repeats 3] [--cases cnn:64:64 resnet18:128:32]
                                   [--engines plain ew hooks ghost fedrad] [--layers]

Engines: ``plain`` (torch SGD, no DP), ``ew`` / ``hooks`` (Opacus' per-sample-gradient engines
with ``DPOptimizer``), ``ghost`` (Opacus' own two-backward ghost clipping, using the Conv2d and
GroupNorm norm samplers fedrad registers), ``fedrad`` (``fedrad.client.training.dp_engine``: mixed ghost
clipping, one backward). Engines are timed round-robin (``--repeats`` rounds of ``--steps``
steps each) and the median round is reported, so a busy machine slows all of them alike.

``--layers`` also times, per convolution of each case, the ghost norm against the materialised
per-sample gradient (what :func:`fedrad.client.training.dp_engine.norm_samplers.prefer_ghost` decides).

Optional allocator: ``LD_PRELOAD=$(ldconfig -p | awk '/libjemalloc.so.2/{print $NF; exit}') python
benchmarks/dp_engine.py`` runs the same with jemalloc (Debian: ``apt-get install libjemalloc2``);
the table's title says which allocator was loaded. fedrad does not require it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fedrad.client.training.dp_engine import make_dp_step, norm_samplers
from fedrad.client.training.dp_engine.mixed import layer_cost_table
from fedrad.common.models import build_model, count_parameters

NOISE, CLIP = 1.0, 1.0
Step = Callable[[], None]


def allocator() -> str:
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in text:
            return name
    return "glibc malloc"


def make_step(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """A closure doing one training step of ``engine`` on (x, y)."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    b = x.shape[0]
    gen = torch.Generator().manual_seed(0)
    if engine == "plain":
        def plain() -> None:
            base.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            base.step()
        return plain
    if engine in ("ew", "hooks"):
        gsm = prepare_module(model, grad_sample_mode=engine, wrap_model=True, batch_first=True,
                             loss_reduction="mean")
        opt = DPOptimizer(base, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=b, generator=gen)

        def opacus() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            opt.step()
        return opacus
    if engine == "ghost":
        gsm = prepare_module(model, grad_sample_mode="ghost", wrap_model=True, batch_first=True,
                             loss_reduction="mean", max_grad_norm=CLIP)
        gopt = DPOptimizerFastGradientClipping(base, noise_multiplier=NOISE, max_grad_norm=CLIP,
                                               expected_batch_size=b, generator=gen)
        crit = DPLossFastGradientClipping(gsm, gopt, nn.CrossEntropyLoss(), "mean")

        def ghost() -> None:
            gopt.zero_grad(set_to_none=True)
            crit(gsm(x), y).backward()
            gopt.step()
        return ghost
    if engine == "fedrad":
        dp = make_dp_step(model, base, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=b,
                          generator=gen, mode="mixed")
        return lambda: dp.step(x, y) and None
    raise SystemExit(f"unknown engine {engine!r}")


def time_case(model_name: str, size: int, batch: int, engines: list[str], steps: int,
              repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=size)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 2, (batch,))
    fns = {}
    for e in engines:
        m = copy.deepcopy(model).train()
        fns[e] = make_step(e, m, x, y)
        fns[e]()  # warm-up
    rounds: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(repeats):
        for e in engines:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[e]()
            rounds[e].append((time.perf_counter() - t0) / steps * 1000)
    return {e: statistics.median(v) for e, v in rounds.items()}


def time_layers(model_name: str, size: int, batch: int, repeats: int) -> Table:
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=1, num_classes=2, image_size=size)
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (i[0].shape, o.shape)))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 1, size, size))
    for h in handles:
        h.remove()
    table = Table(title=f"{model_name} {size}x{size} batch {batch}: ms per conv layer (norm + clipped sum)")
    for col in ("layer", "T", "D", "p", "plain wgrad", "ghost", "per-sample", "chosen"):
        table.add_column(col, justify="right")
    modules = dict(model.named_modules())
    rows = [r for r in layer_cost_table(model, torch.randn(1, 1, size, size)) if r[1] == "Conv2d"]
    for name, _, t, d, p, ghost_chosen in rows:
        layer = modules[name]
        assert isinstance(layer, nn.Conv2d)
        ins, outs = shapes[name]
        a, g = torch.randn(batch, *ins[1:]), torch.randn(batch, *outs[1:])
        coef = torch.rand(batch)

        def best(f: Callable[[], object]) -> float:
            f()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t0) * 1000)
            return min(ts)

        plain = best(lambda: norm_samplers.conv2d_weighted_weight_grad(layer, a, g, coef))
        gh = best(lambda: (norm_samplers.conv2d_weight_ghost_norm2(layer, a, g),
                           norm_samplers.conv2d_weighted_weight_grad(layer, a, g, coef)))

        def per_sample() -> None:
            gs = norm_samplers.conv2d_weight_grad_sample(layer, a, g)
            gs.reshape(batch, -1).pow(2).sum(1)
            torch.einsum("i,i...", coef, gs)
        ps = best(per_sample)
        table.add_row(name, str(t), str(d), str(p), f"{plain:.1f}", f"{gh:.1f}", f"{ps:.1f}",
                      "ghost" if ghost_chosen else "per-sample")
    return table


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=["cnn:64:64", "resnet18:128:32"],
                    help="model:image_size:batch")
    ap.add_argument("--engines", nargs="*", default=["plain", "ew", "hooks", "ghost", "fedrad"])
    ap.add_argument("--layers", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(width=200)
    table = Table(title=f"ms per training step on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
                        f"{allocator()}; median of {args.repeats} rounds x {args.steps} steps")
    for col in ("model", "params", "size", "batch", *args.engines):
        table.add_column(col, justify="right")
    for case in args.cases:
        name, size, batch = case.split(":")
        ms = time_case(name, int(size), int(batch), args.engines, args.steps, args.repeats)
        params = count_parameters(build_model(name, in_channels=1, num_classes=2, image_size=int(size)))
        base = ms.get("plain")
        cells = [f"{ms[e]:.0f}" + (f" ({ms[e] / base:.2f}x)" if base and e != "plain" else "") for e in args.engines]
        table.add_row(name, f"{params / 1e6:.2f}M", size, batch, *cells)
        if args.layers:
            console.print(time_layers(name, int(size), int(batch), args.repeats))
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
