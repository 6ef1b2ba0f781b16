"""Per-sample weight gradients of a 3x3 convolution, every way fedrad knows, against the dense one.

Not a test. Why the CNN's DP step stays above 1.2x a plain step on a 2-core CPU (issue 14): a
plain step computes each convolution's weight gradient once for the batch (oneDNN's kernel, near
the CPU's peak); DP-SGD needs it per example. Prints, per layer of the registry CNN at 64x64 and
batch 64 (median ms of ``--repeats``, one process, methods round-robin):

- ``dense``: the plain step's weight gradient (``convolution_backward``, weight only);
- ``grouped``: the engine's per-sample kernel (batch folded into groups; what ``mixed`` runs);
- ``unfold+bmm``: unfolded input and one batched matmul (the engine's path for stems);
- ``window``: no unfolded input: 9 batched matmuls, one per kernel offset, each reading a strided
  window of the zero-padded input (stride 1 only);
- ``gemm only``: the batched matmul of ``unfold+bmm`` alone, unfolded input given (a floor for any
  per-sample method built from torch's matmul);
- ``ghost``: the engine's Gram-matrix norm plus the dense weighted sum it then needs (maps of at
  most :data:`GHOST_MAX_SIDE` only: at 64x64 its 4096 x 4096 Gram matrices take minutes).

Usage::

    python benchmarks/conv_grad_sample.py [--threads 2] [--repeats 7] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fedrad.client.training.dp_engine import norm_samplers as ns

#: (in channels, out channels, map side) of the registry CNN's convolutions at 64x64 (widths 32/64/128).
CNN_LAYERS = [(1, 32, 64), (32, 32, 64), (32, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16)]
GHOST_MAX_SIDE = 32


def window_grad_sample(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(kh*kw, B, Cout, Cin)`` of a stride-1 convolution without an
    unfolded input: the output gradients, padded to the padded input's width, times one strided
    window of the flattened padded input per kernel offset (the padding columns hold zeros)."""
    (kh, kw), (ph, pw), (dh, dw) = layer.kernel_size, layer.padding, layer.dilation  # type: ignore[misc]
    b, cin, _, w = a.shape
    cout, ho, wo = g.shape[1:]
    wp = w + 2 * pw
    length = ho * wp
    max_off = (kh - 1) * dh * wp + (kw - 1) * dw
    rows = -(-(max_off + length) // wp)
    xf = F.pad(a, (pw, pw, ph, rows - a.shape[2] - ph)).reshape(b, cin, -1)
    gp = F.pad(g, (0, wp - wo)).reshape(b, cout, length)
    out = torch.empty(kh * kw, b, cout, cin, dtype=a.dtype)
    for i in range(kh):
        for j in range(kw):
            off = i * dh * wp + j * dw
            torch.bmm(gp, xf[:, :, off:off + length].transpose(1, 2), out=out[i * kw + j])
    return out


def methods(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], object]]:
    w = layer.weight
    b = a.shape[0]
    u = ns.unfold2d(layer, a)
    gl = g.reshape(b, g.shape[1], -1)
    coef = torch.rand(b)
    return {
        "dense": lambda: torch.ops.aten.convolution_backward(g, a, w, None, list(layer.stride), list(layer.padding),
                                                             list(layer.dilation), False, [0, 0], 1,
                                                             [False, True, False]),
        "grouped": lambda: ns.conv2d_weight_grad_sample(layer, a, g),
        "unfold+bmm": lambda: ns.conv2d_weight_grad_sample_unfold(layer, a, g),
        "window": lambda: window_grad_sample(layer, a, g),
        "gemm only": lambda: torch.bmm(gl, u.transpose(1, 2)),
        "ghost": lambda: (ns.conv2d_weight_ghost_norm2(layer, a, g), ns.conv2d_weighted_weight_grad(layer, a, g, coef)),
    }


def check(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> float:
    """Largest difference between the window method and the engine's grouped kernel."""
    ref = ns.conv2d_weight_grad_sample(layer, a, g)
    win = window_grad_sample(layer, a, g).permute(1, 2, 3, 0).reshape(ref.shape)
    return float((win - ref).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = ["dense", "grouped", "unfold+bmm", "window", "gemm only", "ghost"]
    t = Table(title=f"per-sample weight gradients, 3x3 convs of the CNN at 64x64, batch {args.batch}, "
                    f"{args.threads} threads, torch {torch.__version__}: median ms of {args.repeats} (x dense)")
    for col in ("layer", *names, "window err"):
        t.add_column(col, justify="right")
    totals = dict.fromkeys(names, 0.0)
    for cin, cout, side in CNN_LAYERS:
        layer = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        a, g = torch.randn(args.batch, cin, side, side), torch.randn(args.batch, cout, side, side)
        fns = methods(layer, a, g)
        if side > GHOST_MAX_SIDE:
            del fns["ghost"]
        times: dict[str, list[float]] = {n: [] for n in fns}
        for f in fns.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for n in fns:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1000)
        med = {n: statistics.median(v) for n, v in times.items()}
        for n in names:
            totals[n] += med.get(n, 0.0)
        t.add_row(f"{cin}->{cout} @{side}",
                  *(f"{med[n]:.1f} ({med[n] / med['dense']:.1f}x)" if n in med else "-" for n in names),
                  f"{check(layer, a, g):.1e}")
    t.add_row("total", *(f"{totals[n]:.0f} ({totals[n] / totals['dense']:.1f}x)" if n != "ghost" else "-"
                         for n in names), "")
    Console(width=250).print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
