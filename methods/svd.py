"""Truncated SVD of every conv and linear layer: the spatial low-rank control.

Idea: reshape each conv weight N x C x k x k to the matrix W (N x C k^2), keep its best rank-r
approximation W ~ A B from the singular value decomposition (Eckart-Young), and deploy it as a
k x k conv with r filters followed by a 1 x 1 conv r -> N (linear layers: two linear layers). The
ranks are allocated so the whole model meets the params ratio: the same fraction of every layer's
full rank ("uniform") or one global singular-value energy threshold ("energy"), both solved by
bisection.

Citation: the classic baseline of Denton et al., "Exploiting Linear Structure Within Convolutional
Networks for Efficient Evaluation", NeurIPS 2014, and Jaderberg et al., BMVC 2014; docs/papers.md
"Spatial baselines" (truncated SVD of the N x (C k^2) reshape, deployed as two convs), the control
for ``freq_lowrank`` and ``lrsd``.

Stored: two dense factors per factorised layer, A (N x r) as the 1 x 1 conv and B (r x C k^2) as the
k x k conv, each scaled by the square root of the singular values; the bias stays on the 1 x 1 conv.
Layers whose factorisation would not save parameters stay dense (with a ``CompressionWarning``).
A grouped conv is factorised per group (each group's matrix at the same rank r), deployed as two
grouped convs; depthwise convs stay dense (noted in the layer table).

Reconstructions: none of substance; the exact recipe (one-shot SVD, no data) is the textbook one.
The rank allocation rules are this harness's choices.
"""

from __future__ import annotations

from typing import Any

import optuna.distributions as od
import torch
from torch import nn

from methods._allocation import get_allocation
from methods._checks import check_bool
from methods._lowrank import (
    allocate_ranks,
    build_lowrank,
    factorisable_layers,
    group_matrices,
    note_unfactorised,
    rank_table,
    set_module,
    thin_svd,
    unfactorised_layers,
)
from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    Target,
    count_params,
    register_method,
)

__all__ = ["SVD"]


@register_method
class SVD(CompressionMethod):
    """Truncated SVD per layer, ranks allocated over the whole model, deployed as two layers."""

    name = "svd"
    family = "spatial"
    allocations = ("uniform", "energy")
    search_space = {"allocation": od.CategoricalDistribution(list(allocations))}

    def __init__(self, allocation: str = "uniform", include_linear: bool = True) -> None:
        """
        Args:
            allocation: "uniform" (same fraction of each layer's full rank) or "energy" (one global
                threshold on each layer's kept share of squared singular values).
            include_linear: factorise linear layers too (convs always).
        """
        get_allocation(allocation, method=self.name, supported=self.allocations)
        check_bool(self.name, "include_linear", include_linear)
        self.allocation = allocation
        self.include_linear = include_linear

    @torch.no_grad()
    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        layers = factorisable_layers(model, include_linear=self.include_linear, grouped=True)
        left = unfactorised_layers(model, layers, self.name)
        # float64 SVD (batched over a grouped conv's groups): exact control, on the tall
        # orientation (thin_svd: 2.7-9x faster than on the wide N x C k^2 matrix)
        decompositions = [
            thin_svd(group_matrices(model.get_submodule(layer.name)).double()) for layer in layers
        ]
        plan = allocate_ranks(
            layers,
            count_params(model),
            target,
            allocation=self.allocation,
            spectra=[s.square().mean(0).sqrt() for _, s, _ in decompositions],
            method=self.name,
            unfactorised=left,
        )
        for layer, rank, (u, s, vh) in zip(layers, plan.ranks, decompositions):
            if rank is None:
                continue
            module = model.get_submodule(layer.name)
            root = s[:, :rank].sqrt()
            dtype = module.weight.dtype
            a = (u[:, :, :rank] * root.unsqueeze(1)).to(dtype)
            b = (root.unsqueeze(2) * vh[:, :rank]).to(dtype)
            if layer.groups == 1:
                a, b = a[0], b[0]
            set_module(model, layer.name, build_lowrank(module, a, b))
        note_unfactorised(model, left)
        return model

    def layer_table(self, model: nn.Module) -> list[dict[str, Any]]:
        """Rank of every factorised layer; why each depthwise conv stayed dense."""
        return rank_table(model)
