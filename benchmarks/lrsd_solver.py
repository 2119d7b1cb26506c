"""lrsd's SVD-free solver against an SVD-based solve of the same objective, per layer of VGG-16-BN.

For every conv and linear layer of a randomly initialised ``vgg16_bn_cifar`` it builds Sigma from
synthetic images run through the dense network (the same ``input_covariance`` and relative ridge
that ``lrsd`` uses) and solves, at the rank ``lrsd`` would give that layer for ``--ratio``:

- ``greedy``: ``greedy_bilateral`` with no sparse part (pure low rank, the same objective);
- ``rrr``: the closed-form reduced-rank regression optimum, L = U_r U_r^T W with U_r the top left
  singular vectors of W Sigma^(1/2) (Sigma^(1/2) from ``torch.linalg.eigh``, then an SVD);
- ``svd``: plain truncated SVD of W (data-free, what ``svd`` deploys), error only;
- ``greedy+S``: the greedy solver at ``--sparse-share`` of the same budget spent on S.

Errors are relative output errors ||(W - approx) X|| / ||W X||, from Sigma. Usage::

    python benchmarks/lrsd_solver.py --width 0.5 --ratio 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

import bench.models
from methods._lowrank import factorisable_layers, truncated_svd, weight_matrix
from methods._lrsd_solver import (
    add_ridge,
    greedy_bilateral,
    input_covariance,
    reconstruction_error,
)
from methods.base import CalibData, CompressionWarning, Target, count_params
from methods.lrsd import LRSD, plan_splits


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="VGG-16-BN channel multiplier")
    parser.add_argument("--ratio", type=float, default=4.0, help="whole-model params ratio")
    parser.add_argument("--batches", type=int, default=2, help="synthetic batches for Sigma")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--sparse-share", type=float, default=0.2)
    parser.add_argument("--rank-step", type=int, default=16)
    parser.add_argument("--solver-iters", type=int, default=3)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def _rrr(w: torch.Tensor, sigma: torch.Tensor, rank: int) -> torch.Tensor:
    """Closed-form min ||(W - L) Sigma^(1/2)||_F over rank(L) <= rank, via SVD."""
    evals, evecs = torch.linalg.eigh(sigma)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    u = torch.linalg.svd(w @ root, full_matrices=False).U[:, :rank]
    return u @ (u.T @ w)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench.models.create_model(
        "vgg16_bn_cifar", num_classes=10, in_chans=3, width=args.width
    ).eval()
    n_images = args.batches * args.batch_size
    data = CalibData.synthetic((3, 32, 32), 10, n_batches=args.batches, batch_size=args.batch_size)
    layers = factorisable_layers(model)
    eps = LRSD().eps  # the method's default ridge, relative to Sigma's mean diagonal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        pure = plan_splits(layers, count_params(model), Target(ratio=args.ratio), 0.0)
        mixed = plan_splits(
            layers, count_params(model), Target(ratio=args.ratio), args.sparse_share
        )
    solver = {
        "rank_step": args.rank_step,
        "solver_iters": args.solver_iters,
        "power_iters": args.power_iters,
    }
    rows = []
    for layer, low, both in zip(layers, pure, mixed):
        if low is None or both is None:
            continue  # left dense at this ratio
        w = weight_matrix(model.get_submodule(layer.name)).float()
        sigma = add_ridge(input_covariance(model, layer.name, data, n_images), eps).float()
        (u, v, _, _), t_greedy = _timed(greedy_bilateral, w, sigma, low.rank, 0, **solver)
        l_rrr, t_rrr = _timed(_rrr, w, sigma, low.rank)
        a, b = truncated_svd(w, low.rank)
        (u2, v2, s2, _), t_mixed = _timed(greedy_bilateral, w, sigma, both.rank, both.nnz, **solver)
        rows.append(
            {
                "layer": layer.name,
                "m x d": f"{layer.m}x{layer.d}",
                "rank": low.rank,
                "greedy ms": t_greedy,
                "rrr ms": t_rrr,
                "greedy err": reconstruction_error(w, u @ v, sigma),
                "rrr err": reconstruction_error(w, l_rrr, sigma),
                "svd err": reconstruction_error(w, a @ b, sigma),
                "greedy+S (r, nnz)": f"{both.rank}, {both.nnz}",
                "greedy+S ms": t_mixed,
                "greedy+S err": reconstruction_error(w, u2 @ v2 + s2, sigma),
            }
        )
    print(
        f"vgg16_bn_cifar width {args.width}, ratio {args.ratio:g}, Sigma from {n_images} synthetic "
        f"images, {torch.get_num_threads()} threads, float32\n"
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
