"""A method for testing the harness's tuning: its hyperparameters can make it miss the target
(``sloppy``), blow the loss up to NaN (``explode``) or take its time (``delay``, seconds)."""

import time

import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from methods._masks import apply_mask
from methods.base import CompressionMethod, count_params, register_method


@register_method
class Probe(CompressionMethod):
    name = "probe"
    family = "spatial"
    structured = False
    search_space = {
        "sloppy": CategoricalDistribution([False, True]),
        "explode": CategoricalDistribution([False, True]),
    }

    def __init__(self, sloppy: bool = False, explode: bool = False, delay: float = 0.0) -> None:
        self.sloppy = sloppy
        self.explode = explode
        self.delay = delay

    def compress(self, model, target, data, finetune):
        time.sleep(self.delay)
        ratio = target.ratio * (0.6 if self.sloppy else 1.0)
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        n_zero = max(count_params(model) - round(count_params(model) / max(ratio, 1.0)), 1)
        flat = torch.cat([m.weight.detach().abs().flatten() for m in layers])
        threshold = flat.kthvalue(n_zero).values
        for m in layers:
            apply_mask(m, (m.weight.detach().abs() > threshold).float())
        if self.explode:  # NaN weights: the first training step's loss is NaN
            with torch.no_grad():
                layers[-1].parametrizations.weight.original.fill_(float("nan"))
        return model
