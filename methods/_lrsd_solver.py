"""The per-layer problem of ``lrsd``: a layer's input second moment Sigma, and its SVD-free solver.

``input_covariance`` runs training images through the (partly compressed) model and stops at the
layer, keeping im2col patches (``F.unfold``) of its input: Sigma = X X^T / n. ``greedy_bilateral``
solves min 1/2 tr((W - UV - S) Sigma (W - UV - S)^T) with rank(UV) <= r and nnz(S) <= c using only
matrix products, QR and small linear solves (no SVD, no eigendecomposition). See ``methods.lrsd``
for the method and its citation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CalibData, MethodConfigError

__all__ = [
    "MAX_COLUMNS",
    "add_ridge",
    "greedy_bilateral",
    "input_covariance",
    "output_gram",
    "reconstruction_error",
]

# At most this many im2col columns (patches) go into Sigma per layer: plenty for a d <= 4608 layer
# and it keeps X X^T cheap.
MAX_COLUMNS = 4096


# ------------------------------------------------------------------------------------ inputs
class _Captured(Exception):
    """Raised by the input hook to stop the forward pass once the layer's input is in hand."""


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its matrix view: (positions, d)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):  # "valid" or "same" ("same" puts an odd pixel on the right)
        pads: list[int] = []
        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = dil * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = 0
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _sampled_rows(model: nn.Module, name: str, data: CalibData, n_samples: int, max_columns: int):
    """Yield batches of the layer's input patches (float64 rows of X^T), randomly subsampled to
    ``max_columns`` in all (spread over the batches by image count)."""
    module = model.get_submodule(name)
    device = module.weight.device

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise _Captured(args[0])

    handle = module.register_forward_pre_hook(hook)
    seen = 0
    try:
        for images, _ in data.batches():
            images = images[: n_samples - seen].to(device)
            try:
                model(images)
                raise RuntimeError(f"layer {name!r} did not run in the forward pass")
            except _Captured as captured:
                rows = _patches(module, captured.args[0])
            keep = math.ceil(max_columns * len(images) / n_samples)
            if rows.shape[0] > keep:
                rows = rows[torch.randperm(rows.shape[0])[:keep].to(device)]
            yield rows.double()
            seen += len(images)
            if seen >= n_samples:
                break
    finally:
        handle.remove()


@torch.no_grad()
def input_covariance(
    model: nn.Module, name: str, data: CalibData, n_samples: int, *, max_columns: int = MAX_COLUMNS
) -> torch.Tensor:
    """Sigma = X X^T / n (float64, d x d) of layer ``name``'s inputs in ``model`` as it is now.

    Runs up to ``n_samples`` training images, stopping each forward pass at the layer; keeps a
    random subset of patches (``max_columns`` in all, spread over the batches by image count).
    """
    sigma, columns = None, 0
    for rows in _sampled_rows(model, name, data, n_samples, max_columns):
        sigma = rows.T @ rows if sigma is None else sigma + rows.T @ rows
        columns += rows.shape[0]
    if sigma is None:
        raise MethodConfigError("lrsd: the calibration data yielded no batches")
    return sigma / columns


@torch.no_grad()
def output_gram(
    model: nn.Module,
    name: str,
    w: torch.Tensor,
    data: CalibData,
    n_samples: int,
    eps: float,
    *,
    max_columns: int = MAX_COLUMNS,
) -> torch.Tensor:
    """W (Sigma + ridge) W^T (m x m, float64) with Sigma and its ridge as ``input_covariance`` and
    ``add_ridge`` make them (the same sampled patches), but from the layer's outputs W X: m x n
    products instead of forming the d x d Sigma (10x less work at d = 4608)."""
    gram, sq, columns = None, 0.0, 0
    for rows in _sampled_rows(model, name, data, n_samples, max_columns):
        out = rows @ w.T  # n x m
        gram = out.T @ out if gram is None else gram + out.T @ out
        sq += float((rows * rows).sum())
        columns += rows.shape[0]
    if gram is None:
        raise MethodConfigError("lrsd: the calibration data yielded no batches")
    scale = max(sq / columns / w.shape[1], 1e-12)  # mean(diag Sigma), as add_ridge takes it
    return gram / columns + eps * scale * (w @ w.T)


def add_ridge(sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """Sigma + eps * mean(diag Sigma) * I: scale-free, and positive definite for eps > 0."""
    scale = float(sigma.diagonal().mean().clamp_min(1e-12))
    out = sigma.clone()
    out.diagonal().add_(eps * scale)  # no d x d identity: at d = 4608 that was 0.5 s a layer
    return out


# ------------------------------------------------------------------------------------ solver
def _top_eigenvalue(sigma: torch.Tensor, iters: int = 30) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration (no decomposition)."""
    x = torch.randn(sigma.shape[0], 1, dtype=sigma.dtype, device=sigma.device)
    value = 0.0
    for _ in range(iters):
        y = sigma @ x
        value = float(y.norm())
        if value == 0.0:
            return 0.0
        x = y / value
    return value


def _hard_threshold(matrix: torch.Tensor, nnz: int) -> torch.Tensor:
    """0/1 mask (same dtype) of the ``nnz`` entries of largest magnitude."""
    mask = torch.zeros(matrix.numel(), dtype=matrix.dtype, device=matrix.device)
    mask[torch.topk(matrix.abs().flatten(), nnz).indices] = 1.0
    return mask.reshape(matrix.shape)


def _sparse_times(s: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``s @ dense`` for a mostly-zero ``s`` (m x d): a CSR product, nnz x columns of work."""
    if s.device.type != "cpu" or int(torch.count_nonzero(s)) > 0.3 * s.numel():
        return s @ dense
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.mm(s.to_sparse_csr(), dense)


def _objective(error: torch.Tensor, sigma: torch.Tensor) -> float:
    """1/2 tr(E Sigma E^T) = 1/2 ||E X||^2 / n."""
    return 0.5 * float(((error @ sigma) * error).sum())


@torch.no_grad()
def greedy_bilateral(
    w: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    nnz: int,
    *,
    rank_step: int = 16,
    power_iters: int = 2,
    solver_iters: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """min 1/2 tr((W - UV - S) Sigma (W - UV - S)^T), rank(UV) <= rank, nnz(S) <= nnz; no SVD.

    Args:
        w: m x d weight matrix.
        sigma: d x d input second moment (positive definite: add the ridge first).
        rank: target rank r (0 = no low-rank part).
        nnz: number of nonzeros c of S (0 = no sparse part).
        rank_step: rank added per greedy step.
        power_iters: power iterations on the residual per new block of directions.
        solver_iters: alternating sweeps (S step, U step, V step) after each rank step.

    Returns:
        (u, v, s, mask): u m x r with orthonormal columns, v r x d, s m x d (zero off the mask),
        mask m x d with exactly ``nnz`` ones.
    """
    m, d = w.shape
    u = w.new_zeros(m, 0)
    v = w.new_zeros(0, d)
    mask = w.new_zeros(m, d)
    s = w.new_zeros(m, d)
    if nnz > 0 and rank == 0:
        # start at magnitude pruning; the projected gradient steps below only improve on it
        mask = _hard_threshold(w, nnz)
        s = w * mask
    # step 1 / Lipschitz constant of the S-gradient; 5 % margin over the power estimate
    eta = 1.0 / max(1.05 * _top_eigenvalue(sigma), 1e-30)
    s_started = rank == 0
    # With a sparse part, every product with Sigma is split as (W - UV - S) Sigma = W Sigma -
    # U (V Sigma) - S Sigma: W Sigma once (m d^2), S Sigma as a sparse product (nnz d), instead of
    # an m x d x d product per step (the same numbers up to rounding, 10-30x less work)
    w_sigma = w @ sigma if nnz > 0 else None
    while True:
        if u.shape[1] < rank:
            # greedy step: new directions = top left singular vectors of R Sigma^(1/2), R the
            # residual, found by power iteration on R Sigma R^T and made orthonormal to U by QR
            q = min(rank_step, rank - u.shape[1])
            residual = w - s - u @ v
            y = torch.randn(m, q, dtype=w.dtype, device=w.device)
            for _ in range(max(power_iters, 1)):
                y = residual @ (sigma @ (residual.T @ y))
                y = torch.linalg.qr(y - u @ (u.T @ y)).Q
            u = torch.cat([u, y], dim=1)
            v = u.T @ (w - s)  # exact least squares for V given orthonormal U (Sigma cancels)
        for _ in range(solver_iters):
            if nnz > 0:
                if not s_started:
                    # first S: the thresholded residual (exact for Sigma = I), kept if it helps
                    residual = w - u @ v
                    mask = _hard_threshold(residual, nnz)
                    r_sigma = w_sigma - u @ (v @ sigma)
                    kept = residual * mask
                    rest = residual - kept  # residual * (1 - mask)
                    before = 0.5 * float((r_sigma * residual).sum())
                    after = 0.5 * float(((r_sigma - _sparse_times(kept, sigma)) * rest).sum())
                    if after < before:
                        s = kept
                    s_started = True
                # minus the gradient in S: (W - UV - S) Sigma
                grad = w_sigma - u @ (v @ sigma) - _sparse_times(s, sigma)
                mask = _hard_threshold(s + eta * grad, nnz)
                s = (s + eta * grad) * mask
            if u.shape[1] > 0:
                a = w - s
                sv = sigma @ v.T  # d x k
                # exact least squares for U: U (V Sigma V^T) = A Sigma V^T, a k x k system solved
                # in float64 with a tiny ridge in case V lost rank
                gram = (v @ sv).double()
                ridge = 1e-12 * float(gram.diagonal().mean().clamp_min(1e-300))
                gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=w.device)
                a_sv = a @ sv if w_sigma is None else w_sigma @ v.T - _sparse_times(s, sv)
                u = torch.linalg.solve(gram, a_sv.T.double()).T.to(w.dtype)
                u, _ = torch.linalg.qr(u)
                v = u.T @ a
        if u.shape[1] >= rank:
            return u, v, s, mask


def reconstruction_error(w: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    """Relative output error ||(W - approx) X|| / ||W X|| of one layer, from Sigma."""
    return math.sqrt(_objective(w - approx, sigma) / max(_objective(w, sigma), 1e-300))
