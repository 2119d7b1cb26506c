"""What the contract checks of ``bench.testing`` run on: small models, their data and fine-tuning.

A :class:`ContractCase` is one method on one model; it builds fresh dense models and synthetic
data on demand, and compresses with every RNG seeded. The checks of one case share one
compression (``ContractCase.compress`` keeps the last few, and hands out copies).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    Target,
    create_method,
    get_method_class,
)

__all__ = ["CONTRACT_MODELS", "ContractCase", "SyntheticFinetune"]


class SyntheticFinetune:
    """A real ``Finetune`` on synthetic batches: a few SGD steps per "epoch", for tests only.

    It trains (so masks and fixed patterns are exercised by real optimizer steps) but stays fast:
    one epoch = the calibration batches once.
    """

    def __init__(self, data: CalibData, lr: float = 0.01) -> None:
        self.data = data
        self.lr = lr
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.epochs_trained = 0.0

    def __call__(self, model: nn.Module, epochs: float, *, regularizer=None) -> float:
        batches = self.data.take(10**6)
        steps = max(1, round(epochs * len(batches))) if epochs > 0 else 0
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        model.train()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss = nn.functional.cross_entropy(model(x), y)
            extra = regularizer(model) if regularizer is not None else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.epochs_trained += epochs
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return 100.0 * correct / sum(len(y) for _, y in batches)

    def log(self, metrics, step: int) -> None:
        self.logged.append((step, dict(metrics)))


_INPUT = (3, 16, 16)  # C, H, W of the contract's images


@torch.no_grad()
def _trained_like(model: nn.Module) -> nn.Module:
    """Give a freshly initialised model the two traits of a trained one that the checks need.

    - Linear layers get PyTorch's default init: timm's classifier init (std 0.01) lies wholly
      below a global magnitude threshold, so magnitude pruning would mask the whole classifier
      and every compressed output would be 0.
    - BatchNorm statistics are estimated on random images: with the init statistics a width-0.125
      VGG-16's logits are ~1e-5, and every output check would pass whatever the method did.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    model.eval()
    for norm in norms:  # only the norms train: dropout would draw from the global RNG
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
        norm.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(32, *_INPUT, generator=gen))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _tiny_vgg() -> nn.Module:
    import bench.models

    model = bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=0.125)
    return _trained_like(model)


def _tiny_resnet() -> nn.Module:
    import bench.models

    model = bench.models.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.5)
    return _trained_like(model)


# Small models the contract runs on: a plain conv chain and a residual net (input 3 x 16 x 16),
# randomly initialised but "trained-like" (see _trained_like).
CONTRACT_MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": _tiny_vgg,
    "resnet": _tiny_resnet,
}

# The last few compressions, by case and seed: the checks of one case share one (copied out).
_COMPRESSED: OrderedDict[tuple, tuple[CompressionMethod, nn.Module, nn.Module]] = OrderedDict()
_KEEP = 4


@dataclass
class ContractCase:
    """One method on one model: builds fresh dense models and data on demand."""

    method: str
    model_factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int] = (3, 16, 16)
    num_classes: int = 10
    ratio: float = 2.0
    hyperparameters: dict = field(default_factory=dict)

    def dense(self, seed: int = 0) -> nn.Module:
        """A fresh dense model, initialised under ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return self.model_factory().eval()

    def data(self) -> CalibData:
        return CalibData.synthetic(self.input_shape, self.num_classes, n_batches=3, batch_size=16)

    def build(self) -> CompressionMethod:
        return create_method(self.method, **self.hyperparameters)

    def compress_with(
        self,
        target: Target,
        *,
        seed: int = 0,
        weights: int | None = None,
        finetune: Finetune | None = None,
    ) -> tuple[CompressionMethod, nn.Module, nn.Module]:
        """(method, dense, compressed): a fresh dense model (initialised under seed ``weights``,
        default ``seed``) compressed to ``target`` under ``torch.manual_seed(seed)``, fine-tuned by
        ``finetune`` (default: :class:`SyntheticFinetune` on the case's data)."""
        dense = self.dense(seed if weights is None else weights)
        method = self.build()
        torch.manual_seed(seed)
        data = self.data()
        finetune = finetune if finetune is not None else SyntheticFinetune(data)
        compressed = method.compress(copy.deepcopy(dense), target, data, finetune)
        return method, dense, compressed

    def compress(
        self, seed: int = 0, *, fresh: bool = False
    ) -> tuple[CompressionMethod, nn.Module, nn.Module]:
        """(method, dense, compressed) at the case's ratio with every RNG seeded by ``seed``.

        A copy of a kept compression when there is one (``fresh``: compress again regardless).
        """
        key = (
            get_method_class(self.method),
            self.model_factory,
            self.input_shape,
            self.num_classes,
            self.ratio,
            repr(sorted(self.hyperparameters.items())),
            seed,
        )
        if fresh or key not in _COMPRESSED:
            _COMPRESSED[key] = self.compress_with(Target(ratio=self.ratio), seed=seed)
            while len(_COMPRESSED) > _KEEP:
                _COMPRESSED.popitem(last=False)
        _COMPRESSED.move_to_end(key)
        return copy.deepcopy(_COMPRESSED[key])

    def probe(self) -> torch.Tensor:
        return torch.randn(4, *self.input_shape, generator=torch.Generator().manual_seed(123))
