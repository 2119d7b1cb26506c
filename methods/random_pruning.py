"""Random filter pruning: the floor every structured method must beat.

Each conv filter gets a random score; the lowest-scoring filters are removed physically, exactly as
the informed criteria would remove theirs (same prunable layers, same per-layer counts, same
torch-pruning surgery), so any gap to ``l1_filter`` or ``dct_pruning`` is the value of their
criterion.

Citation: none; the random baseline of the pruning literature (e.g. Blalock et al., "What is the
State of Neural Network Pruning?", MLSys 2020).

Stored: the pruned dense model (no masks); every remaining value counts.

Reconstruction: no paper recipe to follow. The scores come from a ``torch.Generator`` seeded by a
draw of the global torch RNG, so ``torch.manual_seed`` fixes the pruned architecture.

The file is ``random_pruning.py``, not ``random.py``: a ``random.py`` shadows the standard library
whenever ``methods/`` is the script directory (``import torch`` then fails). The registry key is
``random``.
"""

from __future__ import annotations

import torch

from methods._structured import PrunableModel, StructuredPruning
from methods.base import register_method

__all__ = ["RandomPruning"]


@register_method
class RandomPruning(StructuredPruning):
    """Remove uniformly random filters (structured).

    Args:
        allocation: ``"uniform"`` (one rate for all prunable layers) or ``"global"`` (one
            threshold over all random scores: random per-layer rates).
    """

    name = "random"
    family = "spatial"

    def filter_scores(self, prunable: PrunableModel) -> list[torch.Tensor]:
        """Uniform [0, 1) scores from a private generator seeded under the global seed."""
        seed = int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(conv.out_channels, generator=gen) for _, conv in prunable.layers]
