"""The orthonormal 2-D DCT of ``methods._dct`` against scipy, its inverse, and the low-band mask."""

import math

import numpy as np
import pytest
import scipy.fft
import torch

from methods._dct import dct2, dct_matrix, idct2, low_band_mask

SIZES = [(1, 1), (3, 3), (5, 7), (8, 8), (7, 4), (32, 32)]


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_dct2_matches_scipy_ortho(h, w):
    x = torch.randn(h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * 100 + w))
    expected = scipy.fft.dctn(x.numpy(), type=2, norm="ortho")
    np.testing.assert_allclose(dct2(x).numpy(), expected, rtol=0, atol=1e-12)


def test_dct2_is_batched_over_leading_axes():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    out = dct2(x)
    assert out.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    # each slice is transformed on its own
    torch.testing.assert_close(out[1, 2], dct2(x[1, 2]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_idct2_inverts_dct2_exactly(h, w):
    gen = torch.Generator().manual_seed(7)
    x64 = torch.randn(4, h, w, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(idct2(dct2(x64)), x64, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct2(idct2(x64)), x64, rtol=0, atol=1e-12)
    x32 = x64.float()
    torch.testing.assert_close(idct2(dct2(x32)), x32, rtol=0, atol=1e-5)
    assert dct2(x32).dtype == torch.float32


def test_idct2_matches_scipy_inverse():
    f = torch.randn(3, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = scipy.fft.idctn(f.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(idct2(f).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16])
def test_dct_matrix_is_orthogonal_with_the_documented_rows(n):
    d = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # row 0 is the constant sqrt(1/n); row u > 0 is sqrt(2/n) cos(pi (2x+1) u / 2n)
    torch.testing.assert_close(d[0], torch.full((n,), math.sqrt(1 / n), dtype=torch.float64))
    if n > 1:
        x = torch.arange(n, dtype=torch.float64)
        row1 = math.sqrt(2 / n) * torch.cos(math.pi * (2 * x + 1) / (2 * n))
        torch.testing.assert_close(d[1], row1)


def test_dct_matrix_rejects_empty_size():
    with pytest.raises(ValueError, match="must be >= 1"):
        dct_matrix(0)


def test_dct2_preserves_energy_and_is_differentiable():
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(dct2(x).square().sum(), x.square().sum())
    assert torch.autograd.gradcheck(dct2, (x,))


@pytest.mark.parametrize(
    ("h", "w", "fraction", "rows", "cols"),
    [
        (8, 8, 0.5, 4, 4),
        (7, 5, 0.5, 4, 3),
        (4, 4, 1.0, 4, 4),
        (32, 16, 0.25, 8, 4),
        (3, 3, 0.1, 1, 1),
    ],
)
def test_low_band_mask_is_the_top_left_ceil_block(h, w, fraction, rows, cols):
    mask = low_band_mask(h, w, fraction)
    assert mask.shape == (h, w) and mask.dtype == torch.bool
    assert int(mask.sum()) == rows * cols
    assert mask[:rows, :cols].all()
    assert not mask[rows:].any() and not mask[:, cols:].any()


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_low_band_mask_rejects_fractions_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        low_band_mask(4, 4, fraction)
