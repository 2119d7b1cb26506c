"""Global magnitude pruning: zero the smallest-magnitude weights of the whole network.

One threshold on |w| over every conv and linear weight (biases and BN are left dense): the weights
below it are zeroed by a fixed binary mask (a parametrisation, ``methods._masks``), which keeps them
at zero through fine-tuning. The pruning is unstructured: stored params drop, but the dense tensors
keep their shapes, so dense MACs and CPU latency do not (report them as unchanged). A params-ratio
target fixes exactly how many weights go: ``dense - round(dense / ratio)``. Explicit per-layer rates
give layer-wise magnitude pruning instead (the same rule inside each layer). With the ``iterative``
schedule the zeroed count grows over ``steps`` rounds along Zhu & Gupta's cubic (or a linear)
sparsity curve, fine-tuning ``epochs_per_step`` epochs between rounds; masks only grow.

Citations: Han, Pool, Tran, Dally. "Learning both Weights and Connections for Efficient Neural
Networks". NeurIPS 2015. Zhu, Gupta. "To prune, or not to prune: exploring the efficacy of pruning
for model compression". ICLR workshop 2018 (arXiv 2017).

Stored: the masked tensors by their nonzeros (``methods.base.stored_params``); indices of the kept
weights are not counted, as in the papers.

Reconstruction: Han et al. set per-layer thresholds from a quality parameter times each layer's
std; a single global threshold hitting an exact count is the common modern reading and is ours.
Fine-tuning between rounds uses the study's recipe through the ``finetune`` callable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from methods._checks import check_choice, check_float, check_int
from methods._masks import apply_mask, masked_weight
from methods._modules import example_input, modules_in_run_order, note_layers, noted_layers
from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    MethodConfigError,
    Target,
    count_params,
    register_method,
    stored_params,
)

__all__ = ["MASKABLE", "Magnitude", "sparsity_fraction"]

# Layers whose weights are masked; biases, BN and other parameters stay dense.
MASKABLE = (nn.modules.conv._ConvNd, nn.Linear)
SCHEDULES = ("oneshot", "iterative")
CURVES = ("cubic", "linear")
# The attribute that magnitude pruning notes on each layer it masked (methods._modules.note_layers).
_NOTE = "magnitude_pruning"


def sparsity_fraction(step: int, steps: int, curve: str) -> float:
    """Share of the final zeroed count reached after ``step`` of ``steps`` rounds (1 at the end).

    ``cubic`` is Zhu & Gupta's ``1 - (1 - t / n)^3`` (fast early, gentle late); ``linear`` is t / n.
    """
    progress = step / steps
    return 1.0 - (1.0 - progress) ** 3 if curve == "cubic" else progress


def _scores(modules: Sequence[nn.Module]) -> torch.Tensor:
    """|w| of every maskable weight, flattened; already-masked weights score -1 (they go first,
    so masks only grow from round to round)."""
    parts = []
    for module in modules:
        score = module.weight.detach().abs().flatten()
        mask = masked_weight(module)
        if mask is not None:
            score = torch.where(mask.flatten().bool(), score, torch.full_like(score, -1.0))
        parts.append(score)
    return torch.cat(parts)


def _mask_smallest(modules: Sequence[nn.Module], n_zero: int) -> None:
    """Mask exactly the ``n_zero`` smallest-|w| weights pooled over ``modules`` (stable on ties)."""
    scores = _scores(modules)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:n_zero]] = False
    offset = 0
    for module in modules:
        n = module.weight.numel()
        apply_mask(module, keep[offset : offset + n].view_as(module.weight))
        offset += n


@register_method
class Magnitude(CompressionMethod):
    """Han et al. 2015: global magnitude pruning with masks, one-shot or iterative.

    Args:
        schedule: ``"oneshot"`` (prune once) or ``"iterative"`` (``steps`` rounds with fine-tuning
            between them).
        steps: rounds of the iterative schedule (>= 1; ignored by ``oneshot``).
        curve: how the zeroed count grows over the rounds: ``"cubic"`` (Zhu & Gupta) or
            ``"linear"``.
        epochs_per_step: fine-tuning epochs between two rounds (>= 0; fractions allowed).
    """

    name = "magnitude"
    family = "spatial"
    structured = False
    search_space = {
        "schedule": CategoricalDistribution(list(SCHEDULES)),
        "steps": IntDistribution(1, 10),
        "curve": CategoricalDistribution(list(CURVES)),
        "epochs_per_step": FloatDistribution(0.25, 4.0, log=True),
    }

    def __init__(
        self,
        schedule: str = "oneshot",
        steps: int = 3,
        curve: str = "cubic",
        epochs_per_step: float = 1.0,
    ) -> None:
        check_choice(self.name, "schedule", schedule, SCHEDULES)
        check_int(self.name, "steps", steps, 1)
        check_choice(self.name, "curve", curve, CURVES)
        check_float(self.name, "epochs_per_step", epochs_per_step, 0.0)
        self.schedule = schedule
        self.steps = steps
        self.curve = curve
        self.epochs_per_step = epochs_per_step

    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        layers = modules_in_run_order(model, example_input(model, data.input_shape), MASKABLE)
        target.check_layer_count(len(layers), "maskable conv and linear layers")
        modules = [module for _, module in layers]
        sizes = [module.weight.numel() for module in modules]
        dense = count_params(model)
        if target.ratio is not None:
            final = dense - round(dense / target.ratio)
            if final > sum(sizes):
                reach = dense / (dense - sum(sizes))
                raise MethodConfigError(
                    f"ratio {target.ratio:g} is out of reach for magnitude on this model: masking "
                    f"every conv and linear weight reaches at most {reach:.1f}x"
                )
        else:
            final_per_layer = [round(p * n) for p, n in zip(target.layer_rates, sizes)]
        rounds = self.steps if self.schedule == "iterative" else 1
        for step in range(1, rounds + 1):
            share = sparsity_fraction(step, rounds, self.curve)
            if target.ratio is not None:
                _mask_smallest(modules, round(share * final))
            else:
                for module, n_zero in zip(modules, final_per_layer):
                    _mask_smallest([module], round(share * n_zero))
            kept = sum(int(masked_weight(module).sum()) for module in modules)
            finetune.log(
                {
                    "prune_sparsity": 1 - kept / sum(sizes),
                    "prune_params_ratio": dense / stored_params(model),
                },
                step=step,
            )
            if step < rounds:
                finetune(model, self.epochs_per_step)
        note_layers(layers, _NOTE)
        return model

    def layer_table(self, model: nn.Module) -> list[dict[str, Any]]:
        """One row per layer that magnitude pruning masked in ``model``: weights, kept, sparsity."""
        rows = []
        for name, module, _ in noted_layers(model, _NOTE):
            mask = masked_weight(module)
            # a mask baked into its weight (deployment) leaves its zeros behind
            kept = mask.sum() if mask is not None else torch.count_nonzero(module.weight)
            n = module.weight.numel()
            rows.append(
                {"layer": name, "weights": n, "kept": int(kept), "sparsity": 1 - float(kept) / n}
            )
        return rows
