"""L1-norm filter pruning: remove the filters with the smallest sum of absolute weights.

Each conv filter's importance is the L1 norm of its weights, ``sum |W[n, :, :, :]|``; the filters
with the smallest norms are removed physically, together with their BN channels and the matching
input channels of the next layer, so the deployed model is smaller in params and MACs. Per-layer
rates can be given explicitly (the paper's "VGG-16-pruned-A" prunes 50 % of conv1 and conv8-13);
for a params-ratio target the rate is solved by bisection, the same for every layer (``uniform``) or
by one threshold over per-layer-normalised norms (``global``).

Citation: Li, Kadav, Durdanovic, Samet, Graf. "Pruning Filters for Efficient ConvNets". ICLR 2017.

Stored: the pruned dense model (no masks); every remaining value counts.

Reconstruction: the paper picks per-layer rates by a sensitivity analysis and prunes residual nets
only inside blocks; here the rates come from the target (explicit or solved), and the prunable
layers are those ``methods._structured.prunable_convs`` finds. The ``global`` allocation is our
option, not the paper's.
"""

from __future__ import annotations

import torch

from methods._structured import PrunableModel, StructuredPruning
from methods.base import register_method

__all__ = ["L1Filter"]


@register_method
class L1Filter(StructuredPruning):
    """Li et al. 2017: keep the filters with the largest L1 norm.

    Args:
        allocation: ``"uniform"`` (one rate for all prunable layers) or ``"global"`` (one
            threshold over norms divided by their layer's mean norm).
    """

    name = "l1_filter"
    family = "spatial"

    def filter_scores(self, prunable: PrunableModel) -> list[torch.Tensor]:
        """The L1 norm of each filter's weights (data is not used)."""
        return [conv.weight.detach().abs().sum(dim=(1, 2, 3)) for _, conv in prunable.layers]
