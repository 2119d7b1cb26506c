"""A fixed binary mask on a weight, as a parametrisation: it survives fine-tuning and state dicts.

``stored_params`` (``methods.base``) counts a masked tensor by the mask's nonzeros because the
parametrisation exposes a ``mask`` buffer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Mask", "apply_mask", "bake_parametrizations", "masked_weight", "remove_masks"]


class Mask(nn.Module):
    """``weight -> weight * mask``; the mask is a buffer (saved and moved, never trained)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def apply_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.<name>`` with a fixed 0/1 ``mask`` of its shape (replaces an older one)."""
    tensor = getattr(module, name)
    if mask.shape != tensor.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {name} shape {tuple(tensor.shape)}")
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, Mask):
                p.mask.copy_(mask.to(p.mask))
                return
    parametrize.register_parametrization(module, name, Mask(mask.to(tensor.device)))


def masked_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask on ``module.<name>``, or None when it carries none."""
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, Mask):
                return p.mask
    return None


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (zeros stay zeros); returns ``model`` for chaining."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                if any(isinstance(p, Mask) for p in module.parametrizations[name]):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace every parametrised tensor of ``model`` by a plain parameter holding its value.

    Safe on deep copies, unlike ``parametrize.remove_parametrizations``: ``copy.deepcopy`` shares
    the generated ``Parametrized<Module>`` class between the copy and the original, and
    ``remove_parametrizations`` deletes the tensor's property from that shared class, breaking
    the original. Here only the instance's class is switched back. Returns ``model``.
    """
    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        values = {n: getattr(module, n).detach().clone() for n in module.parametrizations}
        module.__class__ = module.__class__.__bases__[0]  # the class before parametrisation
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value))
    return model
