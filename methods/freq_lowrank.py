"""Iterative low-rank compression in the frequency domain (the method this harness exists for).

Idea: train every spatial conv (kernel larger than 1 x 1) in the DCT domain, F = D W D^T per
kernel, with an L1 penalty on F so the kernels become sparse in frequency, and hard-threshold the
small coefficients. Then reshape each layer's F to the frequency matrix M (N x C k^2) and, round
after round, approximate M at rank r with a sample-based low-rank method, fine-tune, recompose
M = A B and shrink the ranks by ``gamma``, until the model meets the target ratio. The deployed
layer runs on the decomposed matrices: a k x k conv with r filters (the rows of B, inverse-DCT'd
back to C x k x k) followed by a 1 x 1 conv r -> N, costing r (C k^2 + N) instead of N C k^2 MACs
per output position.

Citation: Zeng, Liu, Sun, Li, Fang, Lu, "Iterative Deep Model Compression and Acceleration in the
Frequency Domain", ACML 2021, PMLR 157:331-346 (docs/papers.md section 1). Samplers: CUR with
squared-norm sampling (Drineas, Mahoney, Muthukrishnan 2008) and "LinearTimeSVD" (Drineas, Kannan,
Mahoney 2006).

Stored: per compressed conv two dense factors, the k x k conv (r x C x k x k, spatial weights
obtained by the inverse DCT of B) and the 1 x 1 conv (N x r, carrying the bias). A grouped conv is
factorised per group (each group's frequency matrix at one shared rank r), deployed as two grouped
convs; depthwise convs stay dense (each group is 1 x k^2; noted in the layer table). 1 x 1 convs
and linear layers (a 1 x 1 DCT is the identity) are left dense with ``layers="spatial"``, the
paper's setting; with ``"all"`` they go through the same rounds in the weight domain (no L1 term,
no thresholding); ``"auto"`` (the default) is ``"spatial"`` unless that cannot reach the ratio
target (MobileNets, EfficientNets, ConvNeXts keep most of their params in 1 x 1 convs), then
``"all"``. The returned model holds plain convs.

Reconstructions (only the abstract was available; docs/papers.md): every step below is a documented
choice, not the paper's verified recipe: the L1 weight ``lam`` and its optional (1 + u + v)
frequency weighting; thresholding at ``threshold`` x the layer's max |F| after the sparse training;
the samplers and their sample counts (CUR: r columns and r rows, U = C^+ M R^+; LinearTimeSVD: 4 r
columns); the rank schedule (start at ``start_fraction`` of full rank, shrink by ``gamma`` per
round, the last round lands exactly on the bisection-solved final ranks; final ranks are allocated
once, after thresholding); the L1 term is used in the sparse-training phase only, not in the rounds.
Note that F = D W D^T is an orthogonal change of basis of each row of W, so exact SVD truncation in
the frequency domain equals spatial SVD truncation: the frequency domain matters through the sparse
training and the column samplers, which pick frequency columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import optuna.distributions as od
import torch
from torch import nn
from torch.nn.utils import parametrize

from methods._allocation import get_allocation
from methods._checks import check_bool, check_choice, check_float, check_int
from methods._dct import dct2, idct2
from methods._lowrank import (
    LayerInfo,
    LowRank,
    allocate_ranks,
    balance,
    build_lowrank,
    factorisable_layers,
    lowest_params,
    note_unfactorised,
    rank_table,
    set_module,
    singular_values,
    thin_svd,
    truncated_svd,
    unfactorised_layers,
)
from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    MethodConfigError,
    Target,
    count_params,
    register_method,
)

__all__ = [
    "LAYER_CHOICES",
    "SAMPLERS",
    "FreqLowRank",
    "FromDCT",
    "dct_coefficients",
    "low_rank_factors",
    "parametrize_dct",
    "remove_dct",
]

SAMPLERS = ("cur", "lineartime", "svd")
LAYER_CHOICES = ("auto", "spatial", "all")
# LinearTimeSVD samples this many columns per kept rank (Drineas et al. take c >= r; 4 r is cheap)
_LINEARTIME_OVERSAMPLE = 4


# ------------------------------------------------------------------------- DCT parametrisation
class FromDCT(nn.Module):
    """Parametrisation ``W = D^T F D`` per kernel: the stored, trained tensor is F = D W D^T."""

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return idct2(coefficients)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return dct2(weight)


def dct_coefficients(module: nn.Module) -> torch.Tensor | None:
    """The trainable DCT coefficients F of a DCT-parametrised conv, else None."""
    if parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, FromDCT) for p in module.parametrizations.weight
    ):
        return module.parametrizations.weight.original
    return None


def parametrize_dct(model: nn.Module, names: list[str]) -> None:
    """Make the convs at ``names`` train their DCT coefficients (same outputs, to rounding)."""
    for name in names:
        module = model.get_submodule(name)
        if dct_coefficients(module) is None:
            parametrize.register_parametrization(module, "weight", FromDCT())


def remove_dct(model: nn.Module) -> nn.Module:
    """Bake every DCT parametrisation back into a plain spatial weight; returns ``model``."""
    for module in model.modules():
        if dct_coefficients(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# ----------------------------------------------------------------------------------- samplers
def _probabilities(weights: torch.Tensor) -> np.ndarray:
    """Sampling probabilities proportional to ``weights`` (squared norms), floored at 1e-6 / n.

    The floor lets sampling without replacement pick k indices when fewer than k are nonzero.
    """
    p = weights.double().cpu().numpy()
    total = p.sum()
    p = p / total if total > 0 else np.full_like(p, 1.0 / len(p))
    p = (1.0 - 1e-6) * p + 1e-6 / len(p)
    return p / p.sum()


def low_rank_factors(
    matrix: torch.Tensor, rank: int, sampler: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (a: m x r, b: r x d, balanced) of ``matrix`` by ``sampler``.

    - ``cur``: r columns C and r rows R sampled without replacement by squared norm,
      U = C^+ M R^+, a = C U, b = R.
    - ``lineartime``: c = 4 r columns sampled with replacement by squared norm and rescaled by
      1 / sqrt(c p_j); a = the top r left singular vectors H of that small m x c matrix, b = H^T M.
    - ``svd``: exact truncated SVD (the control).
    """
    m64 = matrix.double()
    if sampler == "svd":
        a, b = truncated_svd(m64, rank)
    elif sampler == "cur":
        p_cols, p_rows = _probabilities(m64.square().sum(0)), _probabilities(m64.square().sum(1))
        cols = torch.from_numpy(rng.choice(len(p_cols), size=rank, replace=False, p=p_cols))
        rows = torch.from_numpy(rng.choice(len(p_rows), size=rank, replace=False, p=p_rows))
        cols, rows = cols.to(m64.device), rows.to(m64.device)
        c, r = m64[:, cols], m64[rows, :]
        a, b = c @ (torch.linalg.pinv(c) @ m64 @ torch.linalg.pinv(r)), r
    elif sampler == "lineartime":
        p_cols = _probabilities(m64.square().sum(0))
        n_cols = min(m64.shape[1], _LINEARTIME_OVERSAMPLE * rank)
        idx = rng.choice(len(p_cols), size=n_cols, replace=True, p=p_cols)
        scale = torch.from_numpy(1.0 / np.sqrt(n_cols * p_cols[idx]))
        sampled = m64[:, torch.from_numpy(idx).to(m64.device)] * scale.to(m64)
        h = thin_svd(sampled)[0][:, :rank]
        a, b = h, h.T @ m64
    else:
        raise MethodConfigError(f"freq_lowrank: sampler {sampler!r} is not one of {SAMPLERS}")
    a, b = balance(a, b)
    return a.to(matrix.dtype), b.to(matrix.dtype)


# ------------------------------------------------------------------------------------- method
@register_method
class FreqLowRank(CompressionMethod):
    """Sparse DCT-domain training, then iterative sample-based low-rank rounds to the target."""

    name = "freq_lowrank"
    family = "frequency"
    allocations = ("uniform", "energy")
    search_space = {
        "lam": od.FloatDistribution(1e-7, 1e-3, log=True),
        "freq_weight": od.CategoricalDistribution([True, False]),
        "threshold": od.FloatDistribution(0.0, 0.1),
        "sampler": od.CategoricalDistribution(list(SAMPLERS)),
        "gamma": od.FloatDistribution(0.5, 0.95),
        "allocation": od.CategoricalDistribution(list(allocations)),
        "sparsify_epochs": od.FloatDistribution(0.25, 4.0, log=True),
        "epochs_per_round": od.FloatDistribution(0.25, 2.0, log=True),
    }

    def __init__(
        self,
        lam: float = 1e-5,
        freq_weight: bool = True,
        sparsify_epochs: float = 2.0,
        threshold: float = 0.01,
        sampler: str = "lineartime",
        gamma: float = 0.8,
        epochs_per_round: float = 1.0,
        allocation: str = "uniform",
        start_fraction: float = 0.5,
        max_rounds: int = 8,
        layers: str = "auto",
    ) -> None:
        """
        Args:
            lam: weight of the L1 penalty on the DCT coefficients (per coefficient, summed).
            freq_weight: weight coefficient (u, v) by 1 + u + v so high frequencies cost more.
            sparsify_epochs: epochs of sparse training in the DCT domain before the rounds.
            threshold: after sparse training, zero coefficients below this fraction of the
                layer's largest |F|.
            sampler: "lineartime" (default: near-SVD error from 4 r sampled columns), "cur"
                (r columns and r rows; about twice lineartime's error on a decaying spectrum)
                or "svd" (exact truncation, the control).
            gamma: rank shrink factor per round, in (0, 1).
            epochs_per_round: fine-tuning epochs after each factorisation.
            allocation: final ranks by "uniform" fraction of full rank or global "energy" threshold.
            start_fraction: first round's ranks as a fraction of full rank (never below final).
            max_rounds: most rounds; the last one always lands on the final ranks.
            layers: "spatial" (convs larger than 1 x 1, in the DCT domain: the paper), "all"
                (also 1 x 1 convs and linear layers, in the weight domain) or "auto" ("spatial"
                unless only "all" reaches the ratio target).
        """
        n = self.name
        check_float(n, "lam", lam, 0.0)
        check_bool(n, "freq_weight", freq_weight)
        check_float(n, "sparsify_epochs", sparsify_epochs, 0.0)
        check_float(n, "threshold", threshold, 0.0, 1.0, open_high=True)
        check_choice(n, "sampler", sampler, SAMPLERS)
        check_float(n, "gamma", gamma, 0.0, 1.0, open_low=True, open_high=True)
        check_float(n, "epochs_per_round", epochs_per_round, 0.0)
        get_allocation(allocation, method=n, supported=self.allocations)
        check_float(n, "start_fraction", start_fraction, 0.0, 1.0, open_low=True)
        check_int(n, "max_rounds", max_rounds, 1)
        check_choice(n, "layers", layers, LAYER_CHOICES)
        self.lam = lam
        self.freq_weight = freq_weight
        self.sparsify_epochs = sparsify_epochs
        self.threshold = threshold
        self.sampler = sampler
        self.gamma = gamma
        self.epochs_per_round = epochs_per_round
        self.allocation = allocation
        self.start_fraction = start_fraction
        self.max_rounds = max_rounds
        self.layers = layers

    def regularize(self, model: nn.Module) -> torch.Tensor | None:
        """``lam * sum |F|`` over DCT-parametrised convs (weighted by 1 + u + v if
        ``freq_weight``); None when the model has none (the deployed model is plain)."""
        terms = []
        for module in model.modules():
            f = dct_coefficients(module)
            if f is None:
                continue
            if self.freq_weight:
                kh, kw = f.shape[-2:]
                u = torch.arange(kh, device=f.device, dtype=f.dtype).unsqueeze(1)
                v = torch.arange(kw, device=f.device, dtype=f.dtype).unsqueeze(0)
                terms.append(((1.0 + u + v) * f.abs()).sum())
            else:
                terms.append(f.abs().sum())
        if not terms:
            return None
        return self.lam * torch.stack(terms).sum()

    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        model.eval()
        total = count_params(model)
        spatial = factorisable_layers(model, spatial_only=True, grouped=True)
        if not spatial:
            raise MethodConfigError(
                "freq_lowrank: the model has no conv larger than 1 x 1 (depthwise convs aside)"
            )
        layers = self._chosen_layers(model, spatial, total, target)
        left = unfactorised_layers(model, layers, self.name)
        # one numpy stream per call, seeded from torch's global RNG (deterministic under a seed)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        parametrize_dct(model, [layer.name for layer in spatial])
        if self.sparsify_epochs > 0:
            finetune(model, self.sparsify_epochs, regularizer=self.regularize)
        self._hard_threshold(model, spatial)
        spectra = None
        if get_allocation(self.allocation).needs_spectrum:
            with torch.no_grad():
                spectra = [
                    singular_values(self._matrix(model, la).double()).square().mean(0).sqrt()
                    for la in layers
                ]
        final = allocate_ranks(
            layers,
            total,
            target,
            allocation=self.allocation,
            spectra=spectra,
            method=self.name,
            unfactorised=left,
        ).ranks
        dense_convs = {layer.name: model.get_submodule(layer.name) for layer in layers}
        for step, ranks in enumerate(self._schedule(layers, final)):
            last = step == self.max_rounds - 1 or ranks == final
            ranks = final if last else ranks
            for layer, rank in zip(layers, ranks):
                if rank is not None and rank < layer.full_rank:
                    self._factorise(model, layer, rank, rng)
            val = finetune(model, self.epochs_per_round)
            kept = [r for r in ranks if r is not None]
            finetune.log(
                {
                    "round_rank_mean": float(np.mean(kept)) if kept else float("nan"),
                    "round_params_ratio": total / count_params(model),
                    "round_val_top1": float(val),
                },
                step=step,
            )
            if last:
                break
            for layer in layers:
                _recompose(model, layer.name, dense_convs[layer.name])
        note_unfactorised(model, left)
        return remove_dct(model)

    def _chosen_layers(
        self, model: nn.Module, spatial: list[LayerInfo], total: int, target: Target
    ) -> list[LayerInfo]:
        """The layers the rounds factorise, by ``self.layers`` (see the module docstring)."""
        if self.layers == "spatial" or (self.layers == "auto" and target.ratio is None):
            return spatial
        every = factorisable_layers(model, grouped=True)
        if self.layers == "all":
            return every
        reach = total / lowest_params(spatial, total)
        enough = reach >= target.ratio or abs(reach / target.ratio - 1.0) <= target.tolerance
        return spatial if enough else every

    # -- steps
    def _schedule(
        self, layers: list[LayerInfo], final: tuple[int | None, ...]
    ) -> Iterator[tuple[int | None, ...]]:
        """Ranks per round: start_fraction of full rank, times gamma per round, floored at final."""
        starts = [math.ceil(self.start_fraction * layer.full_rank) for layer in layers]
        step = 0
        while True:
            yield tuple(
                None if f is None else max(f, math.floor(s * self.gamma**step))
                for s, f in zip(starts, final)
            )
            step += 1

    @torch.no_grad()
    def _hard_threshold(self, model: nn.Module, layers: list[LayerInfo]) -> None:
        """Zero each DCT layer's coefficients below ``threshold`` x its largest |F|."""
        if self.threshold <= 0:
            return
        for layer in layers:
            f = dct_coefficients(model.get_submodule(layer.name))
            f.masked_fill_(f.abs() < self.threshold * f.abs().max(), 0.0)

    @staticmethod
    def _matrix(model: nn.Module, layer: LayerInfo) -> torch.Tensor:
        """The layer's g x m x d trained matrices: DCT coefficients, or weights for 1 x 1 convs
        and linear layers."""
        return _trained(model.get_submodule(layer.name)).detach().reshape(layer.groups, layer.m, -1)

    @torch.no_grad()
    def _factorise(
        self, model: nn.Module, layer: LayerInfo, rank: int, rng: np.random.Generator
    ) -> None:
        """Replace the dense layer by A (1 x 1) after B (k x k; a DCT conv's B is itself
        DCT-parametrised); a grouped conv's groups are factorised one by one."""
        conv = model.get_submodule(layer.name)
        pairs = [low_rank_factors(m, rank, self.sampler, rng) for m in self._matrix(model, layer)]
        a, b = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        in_dct = dct_coefficients(conv) is not None
        if in_dct:
            b = idct2(b.reshape(layer.groups * rank, *conv.weight.shape[1:]))
        b = b.reshape(layer.groups, rank, -1)
        factorised = build_lowrank(conv, *((a[0], b[0]) if layer.groups == 1 else (a, b)))
        if in_dct:
            parametrize_dct(factorised, ["0"])
        set_module(model, layer.name, factorised)

    def layer_table(self, model: nn.Module) -> list[dict[str, Any]]:
        """Rank of every factorised layer; why each depthwise conv stayed dense."""
        return rank_table(model)


def _trained(module: nn.Module) -> torch.Tensor:
    """The tensor training updates: a DCT conv's coefficients F, else the weight itself."""
    f = dct_coefficients(module)
    return module.weight if f is None else f


@torch.no_grad()
def _recompose(model: nn.Module, name: str, conv: nn.Module) -> None:
    """Put ``conv`` back at ``name`` with F = A B (per group) from the factorised layer there."""
    factorised = model.get_submodule(name)
    if not isinstance(factorised, LowRank):
        return
    first, second = factorised
    groups, rank = factorised.groups, factorised.rank
    a = second.weight.reshape(groups, -1, rank)
    m = torch.bmm(a, _trained(first).reshape(groups, rank, -1))
    _trained(conv).copy_(m.reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(second.bias)
    set_module(model, name, conv)
