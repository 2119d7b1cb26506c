"""Orthonormal DCT-II in torch, as matrix products: differentiable, batched, any device.

torch has no DCT and torch-dct is unmaintained; at kernel sizes (3 x 3, 5 x 5) and feature-map sizes
(<= 64 x 64) a dense matrix product is both the simplest and the fastest form. ``scipy.fft.dctn(x,
norm="ortho")`` is the test oracle.

D[u, x] = a(u) cos(pi (2x + 1) u / 2n), a(0) = sqrt(1/n), a(u > 0) = sqrt(2/n); D is orthogonal, so
the 2-D transform ``D X D^T`` preserves energy (Parseval) and ``D^T F D`` inverts it exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["dct2", "dct_matrix", "idct2", "low_band_mask"]


@lru_cache(maxsize=64)
def _dct_matrix_f64(n: int) -> torch.Tensor:
    u = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    x = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * x + 1) * u / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix D (rows are frequencies)."""
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    return _dct_matrix_f64(n).to(dtype=dtype, device=device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two axes: ``D_h x D_w^T`` (any leading batch axes)."""
    h, w = x.shape[-2:]
    dh = dct_matrix(h, dtype=x.dtype, device=x.device)
    dw = dct_matrix(w, dtype=x.dtype, device=x.device)
    return dh @ x @ dw.T


def idct2(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2`: ``D_h^T f D_w``."""
    h, w = f.shape[-2:]
    dh = dct_matrix(h, dtype=f.dtype, device=f.device)
    dw = dct_matrix(w, dtype=f.dtype, device=f.device)
    return dh.T @ f @ dw


def low_band_mask(
    h: int, w: int, fraction: float = 0.5, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean h x w mask of the top-left low-frequency block, ceil(f h) x ceil(f w)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"band fraction must lie in (0, 1], got {fraction}")
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[: math.ceil(fraction * h), : math.ceil(fraction * w)] = True
    return mask
