"""DCTPruning: rank filters by the DCT energy of the feature maps they produce.

Run the trained, unpruned model on a few training batches and record every prunable conv's
post-ReLU output A (for conv -> BN -> ReLU, ReLU of the BN output). Channel j scores
``S_j = mean over images of sum_{u,v in band} DCT2_ortho(A_j)[u, v]^2``. With the full band (the
released criterion) this equals the channel's squared L2 activation energy by Parseval; the ``low``
band sums only the top-left ``ceil(f H) x ceil(f W)`` block of low frequencies, the part the
abstract motivates the method by. Per layer the highest-scoring filters stay and the rest are
removed physically (torch-pruning fixes BN and the next layer), so the deployed model is smaller in
params and MACs.

Citation: Chen et al. "Discrete cosine transform for filter pruning". Applied Intelligence, 2022
(released code built on HRank's pipeline: Lin et al., "HRank: Filter Pruning using High-Rank Feature
Map", CVPR 2020).

Stored: the pruned dense model (no masks); every remaining value counts.

As released: the full-band score, 5 calibration batches, the model in eval mode, per-layer rates in
HRank's syntax (VGG-16: ``[0.5]*7+[0.95]*5``; the last conv is kept), ``reinit_bn=True`` reproducing
the code's re-initialised BN and classifier. Reconstructions and our choices: the ``low`` band
(``band_fraction``), the ``global`` allocation and ratio targets solved by bisection, copying BN and
classifier weights by default (``reinit_bn=False``). Fine-tuning follows the study's recipe.

Which activation is hooked: the BatchNorm that alone consumes the conv's output (found in
torch-pruning's graph), with ReLU applied. Generic fallback for a conv without such a BN: ReLU of
the conv's own output, i.e. the post-ReLU map when ReLU follows the conv directly, and a
ReLU-rectified stand-in for any other activation.
"""

from __future__ import annotations

import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from methods._checks import check_bool, check_choice, check_float, check_int
from methods._dct import dct2, low_band_mask
from methods._structured import PrunableModel, StructuredPruning, following_batchnorm
from methods.base import MethodConfigError, register_method

__all__ = ["BANDS", "DCTPruning", "dct_band_energy"]

BANDS = ("full", "low")


def dct_band_energy(activations: torch.Tensor, band: str, band_fraction: float) -> torch.Tensor:
    """Per-channel DCT energy summed over a batch of N x C x H x W maps (float64, length C).

    ``band="full"`` sums every coefficient (= the squared L2 norm, Parseval); ``"low"`` sums the
    top-left ``ceil(band_fraction * H) x ceil(band_fraction * W)`` block.
    """
    check_choice("dct_pruning", "band", band, BANDS)
    coeffs = dct2(activations.double())
    energy = coeffs.square()
    if band == "low":
        h, w = activations.shape[-2:]
        energy = energy * low_band_mask(h, w, band_fraction, device=energy.device)
    return energy.sum(dim=(0, 2, 3))


@register_method
class DCTPruning(StructuredPruning):
    """Chen et al. 2022: keep the filters whose post-ReLU maps carry the most DCT energy.

    Args:
        band: ``"full"`` (the released criterion) or ``"low"`` (low-frequency block only).
        band_fraction: side of the low-frequency block as a fraction of H and W, in (0, 1].
        calib_batches: training batches the scores are averaged over (the released code: 5).
        allocation: ``"uniform"`` or ``"global"`` (scores divided by their layer's mean, one
            threshold); used for ratio targets only.
        reinit_bn: re-initialise every BN and linear layer after pruning (the released code's
            quirk); False copies them.
    """

    name = "dct_pruning"
    family = "frequency"
    search_space = {
        "band": CategoricalDistribution(list(BANDS)),
        "band_fraction": FloatDistribution(0.25, 1.0),
        "calib_batches": IntDistribution(1, 10),
        **StructuredPruning.search_space,  # allocation
    }

    def __init__(
        self,
        band: str = "full",
        band_fraction: float = 0.5,
        calib_batches: int = 5,
        allocation: str = "uniform",
        reinit_bn: bool = False,
    ) -> None:
        check_choice(self.name, "band", band, BANDS)
        check_float(self.name, "band_fraction", band_fraction, 0.0, 1.0, open_low=True)
        check_int(self.name, "calib_batches", calib_batches, 1)
        super().__init__(allocation)
        check_bool(self.name, "reinit_bn", reinit_bn)
        self.band = band
        self.band_fraction = band_fraction
        self.calib_batches = calib_batches
        self.reinit_bn = reinit_bn

    def filter_scores(self, prunable: PrunableModel) -> list[torch.Tensor]:
        """Mean per-image band energy of each prunable conv's post-ReLU output channels."""
        model, layers = prunable.model, prunable.layers
        totals: list[torch.Tensor | None] = [None] * len(layers)

        def hook_for(index: int):
            def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
                energy = dct_band_energy(torch.relu(output), self.band, self.band_fraction)
                totals[index] = energy if totals[index] is None else totals[index] + energy

            return record

        hooks = []
        for index, (_, conv) in enumerate(layers):
            bn = following_batchnorm(prunable.graph, conv)
            hooks.append((bn if bn is not None else conv).register_forward_hook(hook_for(index)))
        device = next(model.parameters()).device
        images = 0
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                for x, _ in prunable.data.take(self.calib_batches):
                    model(x.to(device))
                    images += len(x)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        if images == 0:
            raise MethodConfigError(f"{self.name} needs calibration batches but data has none")
        return [total / images for total in totals]
