"""Low-rank plus sparse decomposition with feature-map reconstruction (LRSD).

Idea: approximate each layer's weight matrix W (m x d; a conv N x C x k x k is N x C k^2) by a
rank-r part L = U V plus a sparse part S with c nonzeros, chosen to reproduce the layer's OUTPUTS on
real inputs rather than its weights: min 1/2 ||(W - L - S) X||_F^2, where X (d x n) holds im2col
patches of the layer's input. That needs only Sigma = X X^T / n. Layers are compressed in forward
order, each seeing inputs from the network compressed so far, so later layers make up for earlier
errors. The solver is SVD-free (greedy bilateral smoothing): the rank grows by ``rank_step`` at a
time from a few power iterations on the residual, orthonormalised by QR; U and V are exact least
squares; S takes hard-thresholded (keep the c largest) projected gradient steps.

Citation: Yu, Liu, Wang, Tao, "On Compressing Deep Models by Low Rank and Sparse Decomposition",
CVPR 2017 (docs/papers.md section 3); the bilateral solver follows Zhou and Tao, "GreBsmo", 2013.

Stored: per compressed layer a :class:`LowRankSparse` module: the low-rank branch (a k x k conv with
r filters, then a 1 x 1 conv r -> N; linear layers: two linear layers) plus the sparse branch (a
conv or linear of the original shape whose weight carries a fixed 0/1 mask, ``methods._masks``),
summed; the bias is added once. Grouped and depthwise convs stay dense (the fit needs one input
covariance per layer; their groups would need one each), with the reason in the layer table.
``stored_params`` counts the sparse branch by its c kept values (indices not counted); its dense
MACs are, honestly, unchanged. Fine-tuning keeps the shapes and S's pattern.

Reconstructions (docs/papers.md marks the paper's full text as out of reach): the per-layer budget
is the params of a rank r_l(t) factorisation with one level t for the whole model, solved by
bisection on stored params; ``allocation`` picks r_l: the fraction t of the full rank (``uniform``)
or the smallest rank keeping the share t of the layer's output energy on calibration inputs
(``energy``: eigenvalues of W Sigma W^T, measured on the dense model, the default). Measured on
quickstart at 4x (pure low rank, 1 fine-tuning epoch): uniform 56.1% test top-1, energy 84.1%
(uniform starves the layers whose outputs spread over many directions). The budget's split between
rank and nonzeros is ``sparse_share`` (0 = pure low-rank with reconstruction, 1 = data-aware
magnitude pruning, r = 0); patch subsampling, the relative ridge ``eps`` and the solver's schedule
(S starts at the thresholded residual, the step size is 1 / lambda_max(Sigma) from power iterations)
are this harness's choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna.distributions as od
import torch
from torch import nn

from methods._allocation import get_allocation
from methods._checks import check_float, check_int
from methods._lowrank import (
    LayerInfo,
    Unfactorised,
    allocate_ranks,
    balance,
    build_lowrank,
    conv_like,
    factorisable_layers,
    layer_profiles,
    limits_text,
    note_unfactorised,
    out_of_reach,
    rank_table,
    set_module,
    solve_fraction,
    unfactorised_layers,
    warn_adjusted,
    weight_matrix,
)
from methods._lrsd_solver import add_ridge, greedy_bilateral, input_covariance, output_gram
from methods._masks import apply_mask, masked_weight
from methods._modules import modules_in_run_order
from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    MethodConfigError,
    Target,
    count_params,
    register_method,
)

__all__ = ["LRSD", "LowRankSparse", "Split", "plan_splits"]


# ------------------------------------------------------------------------------------ module
class LowRankSparse(nn.Module):
    """``lowrank(x) + sparse(x)``; either branch may be None. The bias lives on one branch only."""

    def __init__(self, lowrank: nn.Module | None, sparse: nn.Module | None) -> None:
        super().__init__()
        if lowrank is None and sparse is None:
            raise ValueError("LowRankSparse needs at least one branch")
        self.lowrank = lowrank
        self.sparse = sparse

    @property
    def rank(self) -> int:
        return 0 if self.lowrank is None else self.lowrank.rank

    @property
    def nnz(self) -> int:
        """Nonzeros allowed in the sparse branch (the mask's ones)."""
        mask = None if self.sparse is None else masked_weight(self.sparse)
        return 0 if mask is None else int(mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse is None:
            return self.lowrank(x)
        if self.lowrank is None:
            return self.sparse(x)
        return self.lowrank(x) + self.sparse(x)


@torch.no_grad()
def _sparse_like(
    module: nn.Module, weight: torch.Tensor, mask: torch.Tensor, bias: bool
) -> nn.Module:
    """A layer of ``module``'s geometry with ``weight`` under a fixed ``mask`` (bias optional)."""
    if isinstance(module, nn.Conv2d):
        new: nn.Module = conv_like(module, module.out_channels, bias=bias)
    else:
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        new = nn.Linear(module.in_features, module.out_features, bias=bias, **kw)
    shape = module.weight.shape
    new.weight.copy_(weight.reshape(shape) * mask.reshape(shape))
    if bias:
        new.bias.copy_(module.bias.detach())
    apply_mask(new, mask.reshape(shape).to(new.weight))
    return new


# ---------------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class Split:
    """One layer's share of the budget: rank r of L and nonzeros c of S."""

    rank: int
    nnz: int

    def stored(self, layer: LayerInfo) -> int:
        return layer.lowrank_params(self.rank) + self.nnz


def _split(layer: LayerInfo, budget: int, share: float) -> tuple[Split, bool]:
    """Divide ``budget`` weight values between rank and nonzeros; True when the rank was clamped."""
    if share >= 1.0:
        return Split(0, min(max(budget, 1), layer.dense_params)), False
    raw = math.floor((1.0 - share) * budget / (layer.m + layer.d))
    rank = min(max(raw, 1), layer.full_rank)
    nnz = 0 if share <= 0.0 else max(budget - layer.lowrank_params(rank), 0)
    return Split(rank, min(nnz, layer.dense_params)), raw < 1


def plan_splits(
    layers: list[LayerInfo],
    total_params: int,
    target: Target,
    share: float,
    method: str = "lrsd",
    *,
    allocation: str = "uniform",
    spectra: list[torch.Tensor] | None = None,
    unfactorised: list[Unfactorised] | tuple[()] = (),
) -> list[Split | None]:
    """Per-layer (rank, nnz) meeting ``target`` in stored params; None = left dense.

    Layer l's budget at level t is the params of a rank r_l(t) factorisation, r_l(t) (m + d):
    ``uniform``: r_l = t * min(m, d) (with ``share = 0``, ``svd``'s "uniform"); ``energy``: the
    smallest r_l whose share of ``spectra[l]``'s squared values reaches t (one t for the model).
    ``target.layer_rates`` set t per layer (t = 1 - rate, uniform). ``unfactorised`` (the
    layers left dense) are named in the "out of reach" error.
    """
    policy = get_allocation(allocation, method=method)
    profiles = layer_profiles(policy, spectra, len(layers))

    def rank_at(i: int, t: float) -> float:
        return policy.smooth_rank_at(t, layers[i].full_rank, profiles[i])

    def splits_at(levels: list[float]) -> list[tuple[Split, bool]]:
        return [
            _split(layer, math.floor(rank_at(i, t) * (layer.m + layer.d)), share)
            for i, (t, layer) in enumerate(zip(levels, layers))
        ]

    def stored(splits: list[tuple[Split, bool]]) -> int:
        extra = sum(
            min(sp.stored(layer), layer.dense_params) - layer.dense_params
            for (sp, _), layer in zip(splits, layers)
        )
        return total_params + extra

    if share <= 0.0:
        # pure low rank: rank steps are coarse, so use the shared allocator (bisection + top-up)
        plan = allocate_ranks(
            layers,
            total_params,
            target,
            allocation=allocation,
            spectra=spectra,
            method=method,
            unfactorised=unfactorised,
        )
        return [None if r is None else Split(r, 0) for r in plan.ranks]
    if target.layer_rates is not None:
        target.check_layer_count(len(layers), "factorisable layers")
        policy = get_allocation("uniform")  # explicit rates are fractions of each full rank
        splits = splits_at([1.0 - p for p in target.layer_rates])
    else:
        budget = total_params / target.ratio
        lowest = splits_at([0.0] * len(layers))
        floor = stored(lowest)
        if floor > budget:
            factors = sum(
                min(sp.stored(la), la.dense_params) for (sp, _), la in zip(lowest, layers)
            )
            limits = limits_text(unfactorised, floor, factors)
            raise out_of_reach(method, target.ratio, total_params / floor, limits)
        t = solve_fraction(lambda t: stored(splits_at([t] * len(layers))), budget)
        splits = splits_at([t] * len(layers))
        achieved = total_params / stored(splits)
        if abs(achieved / target.ratio - 1.0) > target.tolerance:
            raise MethodConfigError(
                f"{method}: cannot meet ratio {target.ratio:g} within {target.tolerance:.0%} on "
                f"this model (closest {achieved:.3f}): its layers are too small"
            )
    out: list[Split | None] = []
    clamped, dense = [], []
    for (sp, was_clamped), layer in zip(splits, layers):
        keep_dense = sp.stored(layer) >= layer.dense_params
        out.append(None if keep_dense else sp)
        if keep_dense:
            dense.append(layer.name)
        elif was_clamped:
            clamped.append(layer.name)
    warn_adjusted(method, clamped, dense)
    return out


# ---------------------------------------------------------------------------------- method
@register_method
class LRSD(CompressionMethod):
    """Low-rank + sparse decomposition of every conv and linear layer, fit to its feature maps."""

    name = "lrsd"
    family = "spatial"
    # the sparse branch is a masked dense layer: its dense params and MACs do not drop
    structured = False
    allocations = ("uniform", "energy")
    search_space = {
        "sparse_share": od.FloatDistribution(0.0, 1.0),
        "rank_step": od.IntDistribution(4, 64, log=True),
        "n_samples": od.IntDistribution(64, 512, log=True),
        "allocation": od.CategoricalDistribution(list(allocations)),
    }

    def __init__(
        self,
        sparse_share: float = 0.2,
        rank_step: int = 16,
        n_samples: int = 256,
        power_iters: int = 2,
        solver_iters: int = 3,
        eps: float = 1e-4,
        allocation: str = "energy",
    ) -> None:
        """
        Args:
            sparse_share: fraction of each layer's budget spent on S's nonzeros (0 = pure low
                rank, 1 = data-aware magnitude pruning).
            rank_step: rank added per greedy step of the solver.
            n_samples: training images whose layer inputs build Sigma.
            power_iters: power iterations per block of new rank directions.
            solver_iters: alternating (S, U, V) sweeps after each rank step.
            eps: ridge added to Sigma, relative to its mean diagonal (keeps it positive definite).
            allocation: how the model's budget is spread over layers: "uniform" (the same
                fraction of each layer's full rank) or "energy" (one threshold on the share of
                each layer's output energy, the eigenvalues of W Sigma W^T of the dense model,
                that its rank keeps: data-aware, and no SVD of W).
        """
        check_float(self.name, "sparse_share", sparse_share, 0.0, 1.0)
        check_int(self.name, "rank_step", rank_step, 1)
        check_int(self.name, "n_samples", n_samples, 1)
        check_int(self.name, "power_iters", power_iters, 1)
        check_int(self.name, "solver_iters", solver_iters, 1)
        check_float(self.name, "eps", eps, 0.0, 1.0)
        get_allocation(allocation, method=self.name, supported=self.allocations)
        self.sparse_share = sparse_share
        self.rank_step = rank_step
        self.n_samples = n_samples
        self.power_iters = power_iters
        self.solver_iters = solver_iters
        self.eps = eps
        self.allocation = allocation

    @torch.no_grad()
    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        model.eval()
        layers = factorisable_layers(model)
        left = unfactorised_layers(model, layers, self.name)
        device = next(model.parameters()).device
        example = next(iter(data.batches()))[0][:2].to(device)
        wanted = {layer.name for layer in layers}
        run = modules_in_run_order(model, example, (nn.Conv2d, nn.Linear))
        reached = [name for name, _ in run if name in wanted]
        spectra = None
        if get_allocation(self.allocation).needs_spectrum and target.layer_rates is None:
            spectra = [self._output_spectrum(model, layer.name, reached, data) for layer in layers]
        splits = plan_splits(
            layers,
            count_params(model),
            target,
            float(self.sparse_share),
            allocation=self.allocation if spectra is not None else "uniform",
            spectra=spectra,
            unfactorised=left,
        )
        by_name = {layer.name: (layer, split) for layer, split in zip(layers, splits)}
        # layers the forward pass never reaches have no inputs to fit: Sigma = I (a weight fit)
        unreached = [layer.name for layer in layers if layer.name not in reached]
        for name in reached + unreached:
            layer, split = by_name[name]
            if split is None:
                continue
            module = model.get_submodule(name)
            # Sigma is accumulated in float64; the solver runs in float32 (its k x k solves in
            # float64): at d = 4608 that halves the time, and the relative ridge bounds the
            # conditioning
            w = weight_matrix(module).float()
            if name in reached:
                sigma = input_covariance(model, name, data, self.n_samples)
                sigma = add_ridge(sigma, self.eps).float()
            else:
                sigma = torch.eye(layer.d, dtype=w.dtype, device=w.device)
            u, v, s, mask = greedy_bilateral(
                w,
                sigma,
                split.rank,
                split.nnz,
                rank_step=self.rank_step,
                power_iters=self.power_iters,
                solver_iters=self.solver_iters,
            )
            set_module(model, name, _deploy(module, u, v, s, mask))
        note_unfactorised(model, left)
        return model

    def _output_spectrum(
        self, model: nn.Module, name: str, reached: list[str], data: CalibData
    ) -> torch.Tensor:
        """sqrt of the eigenvalues of W Sigma W^T (descending): how the layer's output energy
        on calibration inputs spreads over ranks. An m x m symmetric eigenproblem, not an SVD
        of W; layers the forward pass never reaches use Sigma = I."""
        w = weight_matrix(model.get_submodule(name)).double()
        if name in reached:
            gram = output_gram(model, name, w, data, self.n_samples, self.eps)
        else:
            gram = w @ w.T
        eig = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).clamp_min(0.0)
        return eig.flip(0).sqrt()

    def layer_table(self, model: nn.Module) -> list[dict[str, Any]]:
        """Rank and sparse nonzeros of every decomposed layer; why each grouped or depthwise conv
        stayed dense."""
        rows = [
            {"layer": name, "rank": module.rank, "sparse_nnz": module.nnz}
            for name, module in model.named_modules()
            if isinstance(module, LowRankSparse)
        ]
        return rows + [row for row in rank_table(model) if "left_alone" in row]


def _deploy(
    module: nn.Module, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, mask: torch.Tensor
) -> LowRankSparse:
    """The LowRankSparse module for ``module`` with L = u v and S = s on ``mask``."""
    dtype = module.weight.dtype
    lowrank = None
    if u.shape[1] > 0:
        a, b = balance(u, v)
        lowrank = build_lowrank(module, a.to(dtype), b.to(dtype))
    sparse = None
    if int(mask.sum()) > 0:
        has_bias = module.bias is not None and lowrank is None
        sparse = _sparse_like(module, s.to(dtype), mask.to(dtype), bias=has_bias)
    return LowRankSparse(lowrank, sparse)
