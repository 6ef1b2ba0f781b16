"""Wavelet scattering front end (Tramèr & Boneh 2021, "Differentially private learning needs better features").

A 2D scattering transform (Mallat; the filter bank and algorithm of Kymatio 0.3's ``Scattering2D``) with
``J`` scales and ``L`` orientations, up to order 2, computed with FFT convolutions. It is fixed and
data-independent: the Morlet filters are built from (J, L, image size) alone, held as non-persistent
buffers (never Parameters, never in the state_dict, so they never travel and a coordinator cannot
change them) and no statistic of any data is kept. Each example's features depend on that example only,
so DP-SGD's per-sample gradients of the head are unaffected.

For a ``C x N x N`` input the transform gives ``C * K`` channels at ``ceil-ish N / 2**J`` resolution with
``K = 1 + J L + L^2 J (J - 1) / 2`` (81 for J=2, L=8; 28 x 28 -> 81 x 7 x 7). The registered models put a
data-independent normalisation (GroupNorm without affine parameters, per example) and a small trainable head
on top: ``scatter-cnn`` (conv blocks) and ``scatter-linear`` (one linear layer).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_gn_relu, group_norm
from .registry import register_model


def _gabor_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """A 2D Gabor filter in space on an ``m x n`` periodic grid (5 x 5 periodisation, as Kymatio)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    rot_inv = np.array([[c, s], [-s, c]])
    d = np.array([[1.0, 0.0], [0.0, slant * slant]])
    curv = rot @ d @ rot_inv / (2 * sigma * sigma)
    gab = np.zeros((m, n), np.complex128)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * m:m + ex * m, ey * n:n + ey * n]
            arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy) \
                + 1j * (xx * xi * c + yy * xi * s)
            gab += np.exp(arg)
    return gab / (2 * math.pi * sigma * sigma / slant)


def _morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet wavelet: the Gabor filter minus its envelope scaled to zero mean."""
    wv = _gabor_2d(m, n, sigma, theta, xi, slant)
    env = _gabor_2d(m, n, sigma, theta, 0.0, slant)
    return wv - (wv.sum() / env.sum()) * env


def _periodize(xf: np.ndarray, res: int) -> np.ndarray:
    """A Fourier-domain filter for a signal sub-sampled ``2**res`` times (Kymatio's periodize_filter_fft)."""
    m, n = xf.shape
    k = 2**res
    mask = np.ones_like(xf)
    len_x, start_x = int(m * (1 - 2.0**-res)), int(m * 2.0 ** (-res - 1))
    len_y, start_y = int(n * (1 - 2.0**-res)), int(n * 2.0 ** (-res - 1))
    mask[start_x:start_x + len_x, :] = 0
    mask[:, start_y:start_y + len_y] = 0
    return (xf * mask).reshape(k, m // k, k, n // k).sum(axis=(0, 2))


def padded_size(size: int, j: int) -> int:
    """Kymatio's padded size: a multiple of ``2**J`` with room for reflection at both ends."""
    return ((size + 2**j) // 2**j + 1) * 2**j


def output_size(size: int, j: int) -> int:
    """Spatial side of the scattering output for an input side ``size``."""
    return padded_size(size, j) // 2**j - 2


def num_coefficients(j: int, angles: int, order: int = 2) -> int:
    """Scattering channels per input channel."""
    return 1 + j * angles + (angles * angles * j * (j - 1) // 2 if order == 2 else 0)


class Scattering2D(nn.Module):
    """Order-1 or order-2 2D scattering of ``(B, C, N, N)`` images into ``(B, C*K, n, n)`` (no parameters)."""

    def __init__(self, *, image_size: int, j: int = 2, angles: int = 8, order: int = 2) -> None:
        super().__init__()
        if j < 1 or angles < 1 or order not in (1, 2):
            raise ValueError(f"scattering needs J >= 1, L >= 1, order 1 or 2 (got J={j}, L={angles}, order={order})")
        if output_size(image_size, j) < 1:
            raise ValueError(f"image_size {image_size} is too small for J={j}")
        self.j, self.angles, self.order, self.size = j, angles, order, image_size
        m = padded_size(image_size, j)
        self.padded = m
        self._psi_j: list[int] = []
        psis: dict[tuple[int, int], torch.Tensor] = {}
        # psi levels: the filter at resolution 2**res for res < j (as Kymatio: min(j+1, max(J-1, 1)) levels)
        for jj in range(j):
            for t in range(angles):
                theta = (int(angles - angles / 2 - 1) - t) * math.pi / angles
                psi = np.real(np.fft.fft2(_morlet_2d(m, m, 0.8 * 2**jj, theta, 3.0 / 4.0 * math.pi / 2**jj,
                                                     4.0 / angles)))
                for res in range(min(jj + 1, max(j - 1, 1))):
                    psis[len(self._psi_j), res] = torch.from_numpy(_periodize(psi, res)).float()
                self._psi_j.append(jj)
        phi = np.real(np.fft.fft2(_gabor_2d(m, m, 0.8 * 2 ** (j - 1), 0.0, 0.0)))
        self._pad = ((m - image_size) // 2, (m - image_size + 1) // 2)
        # Filters as used: stacked per scale and pre-divided by the k*k of the sub-sampling that follows them
        # (sub-sampling in Fourier averages k*k aliased blocks; folding the 1/k^2 in saves a pass per call).
        def stack(jj: int, res: int) -> torch.Tensor:  # the L wavelets of scale jj at resolution level res
            return torch.stack([psis[n, res] for n, jn in enumerate(self._psi_j) if jn == jj])

        for j1 in range(j):
            self.register_buffer(f"w1_{j1}", stack(j1, 0) / 4**j1, persistent=False)
            for j2 in range(j1 + 1, j):
                self.register_buffer(f"w2_{j1}_{j2}", stack(j2, j1) / 4 ** (j2 - j1), persistent=False)
        for res in range(j):
            lp = torch.from_numpy(_periodize(phi, res)).float()
            self.register_buffer(f"lp_{res}", lp / 4 ** (j - res), persistent=False)

    @property
    def coefficients(self) -> int:
        return num_coefficients(self.j, self.angles, self.order)

    @staticmethod
    def _subsample(xf: torch.Tensor, k: int) -> torch.Tensor:
        """Sub-sampling by ``k`` in space, done in the Fourier domain: the sum of the ``k*k`` aliased blocks
        (the filters applied before it carry the ``1/k^2`` of the average)."""
        if k == 1:
            return xf
        m, n = xf.shape[-2] // k, xf.shape[-1] // k
        rows = xf[..., :m, :]
        for i in range(1, k):  # slice adds: far faster on CPU than a strided complex mean
            rows = rows + xf[..., i * m:(i + 1) * m, :]
        out = rows[..., :n]
        for i in range(1, k):
            out = out + rows[..., i * n:(i + 1) * n]
        return out

    def _low_pass(self, uf: torch.Tensor, res: int) -> torch.Tensor:
        s = self._subsample(uf * getattr(self, f"lp_{res}"), 2 ** (self.j - res))
        return torch.fft.ifft2(s).real[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"expected (B, C, {self.size}, {self.size}) images, got {tuple(x.shape)}")
        b, c = x.shape[:2]
        lo, hi = self._pad
        u0 = torch.fft.fft2(F.pad(x, (lo, hi, lo, hi), mode="reflect"))  # (B, C, M, M)
        side = self.padded // 2**self.j - 2
        out = [self._low_pass(u0, 0).reshape(b, c, 1, side, side)]
        order2: list[torch.Tensor] = []
        for j1 in range(self.j):  # all L orientations of one scale at once
            u1 = self._subsample(u0[:, :, None] * getattr(self, f"w1_{j1}"), 2**j1)  # (B, C, L, m1, m1)
            u1 = torch.fft.fft2(torch.fft.ifft2(u1).abs())
            out.append(self._low_pass(u1, j1))
            if self.order < 2 or j1 == self.j - 1:
                continue
            per_n1: list[torch.Tensor] = []
            for j2 in range(j1 + 1, self.j):
                u2 = self._subsample(u1[:, :, :, None] * getattr(self, f"w2_{j1}_{j2}"), 2 ** (j2 - j1))
                u2 = torch.fft.fft2(torch.fft.ifft2(u2).abs())  # (B, C, L1, L2, m2, m2)
                per_n1.append(self._low_pass(u2, j2))
            order2.append(torch.cat(per_n1, dim=3).flatten(2, 3))  # n1-major, then (j2, theta2): Kymatio's order
        s = torch.cat(out + order2, dim=2)  # (B, C, K, n, n)
        return s.reshape(b, c * s.shape[2], side, side)


class ScatterNet(nn.Module):
    """Scattering -> per-example GroupNorm (no affine parameters) -> a trainable head."""

    def __init__(self, *, in_channels: int, image_size: int, j: int, angles: int, order: int,
                 norm_groups: int, head: nn.Module) -> None:
        super().__init__()
        self.scattering = Scattering2D(image_size=image_size, j=j, angles=angles, order=order)
        channels = in_channels * self.scattering.coefficients
        if norm_groups < 1 or channels % norm_groups:
            raise ValueError(f"norm_groups must divide the {channels} scattering channels (got {norm_groups})")
        self.norm = nn.GroupNorm(norm_groups, channels, affine=False)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.scattering(x)))


def _check(j: int, angles: int, order: int, image_size: int) -> int:
    side = output_size(image_size, j)
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for J={j}")
    return side


@register_model("scatter-cnn")
def scatter_cnn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    j: int = 2,
    angles: int = 8,
    order: int = 2,
    norm_groups: int = 27,
    widths: tuple[int, ...] | list[int] = (16, 32),
    dropout: float = 0.0,
) -> nn.Module:
    """Scattering (J, L=angles, order) + GroupNorm, then per width a conv-GN-ReLU and a 2x max-pool, then linear."""
    side = _check(j, angles, order, image_size)
    cin = in_channels * num_coefficients(j, angles, order)
    layers: list[nn.Module] = []
    for w in widths:
        layers += [conv_gn_relu(cin, w), nn.MaxPool2d(2, ceil_mode=True)]
        side, cin = (side + 1) // 2, w
    layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * side * side, num_classes)]
    return ScatterNet(in_channels=in_channels, image_size=image_size, j=j, angles=angles, order=order,
                      norm_groups=norm_groups, head=nn.Sequential(*layers))


@register_model("scatter-linear")
def scatter_linear(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    j: int = 2,
    angles: int = 8,
    order: int = 2,
    norm_groups: int = 27,
) -> nn.Module:
    """Scattering + GroupNorm, then one linear layer (the low-epsilon baseline of Tramèr & Boneh)."""
    side = _check(j, angles, order, image_size)
    cin = in_channels * num_coefficients(j, angles, order)
    head = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, num_classes))
    return ScatterNet(in_channels=in_channels, image_size=image_size, j=j, angles=angles, order=order,
                      norm_groups=norm_groups, head=head)


__all__ = ["Scattering2D", "ScatterNet", "group_norm", "num_coefficients", "output_size", "padded_size"]
