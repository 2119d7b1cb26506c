"""The papers' CIFAR models, registered in timm's own registry, and the harness's one model factory.

After ``import bench.models``, ``timm.create_model("resnet56_cifar", num_classes=10)`` works like
any timm name. timm itself has no CIFAR models (its ``vgg16`` at 32 x 32 has 134M params, not the
papers' ~15M), so these follow the code the papers build on (HRank's ``vgg.py`` and
``resnet_cifar.py``, He et al. 2016):

- ``vgg16_bn_cifar``: 13 conv3x3 (bias) + BN + ReLU, max-pools after conv 2, 4, 7, 10; the last
  stage is 2 x 2 at 32 x 32 input and is averaged to 1 x 1 (HRank's ``AvgPool2d(2)``; adaptive
  here, so 28 x 28 Fashion-MNIST works too); classifier Linear(512, 512) -> BN1d -> ReLU -> Linear.
  14.99M params, 313.46M MACs at 32 x 32 with 10 classes (the literature's 313.73M also counts
  the conv bias adds, 0.28M).
- ``resnet{20,56,110}_cifar``: conv3x3(16) + BN + ReLU, three stages of n basic blocks at 16/32/64
  channels (n = 3, 9, 18), option-A shortcuts (stride-2 subsampling + zero channel padding, no
  parameters), global average pool, Linear(64, num_classes). Convs have no bias.

Every module is plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` so compression methods (and
torch-pruning) can find and replace them; the shortcut is a small module class, not a lambda, so
models deepcopy and pickle.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch_pruning as tp
from timm.models import _registry, register_model
from torch import nn

from bench.names import CIFAR_MODELS, unknown_model_message, write_timm_cache

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "ModelError",
    "ShortcutA",
    "canonical_width",
    "create_model",
    "list_cifar_models",
]


class ModelError(ValueError):
    """An unknown model name or an option the model cannot take; the message is one line."""


# VGG-16 feature layout: channel counts, "M" = 2 x 2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip
# Keyword arguments timm's create_model always passes to an entrypoint; meaningless without weights.
_TIMM_BOOKKEEPING = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def _scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU gain), BN to identity, small normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------ VGG
class CifarVGG(nn.Module):
    """VGG-16-BN for 32 x 32 inputs (HRank / DCTPruning's model); any input size >= 16 x 16 works.

    Attributes:
        features: conv/BN/ReLU/max-pool stack (``nn.Sequential``, HRank's layer order).
        pool: adaptive average pool to 1 x 1 (at 32 x 32 input it averages the final 2 x 2 map).
        classifier: Linear -> BN1d -> ReLU -> Linear.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        channels = in_chans
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _scaled(int(v), width)
            # bias=True as in HRank's released model (redundant before BN, but it is in the counts)
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's convention)."""
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------- ResNet
class ShortcutA(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride``, zero-pad the channels; no parameters.

    Input channel ``src[i]`` lands on output channel ``dst[i]``; every other output channel is zero.
    As built, the padding is split evenly before and after the input (HRank pads ``planes // 4`` on
    each side when the channels double). The mapping is held as index buffers, not pad widths, so
    structured pruning can remove any input or output channel (see :meth:`tp_pruner`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ModelError(
                f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        front = (out_channels - in_channels) // 2
        self.register_buffer("src", torch.arange(in_channels))
        self.register_buffer("dst", torch.arange(in_channels) + front)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # keep the input's memory format (channels_last inference) for the residual add
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = x[:, :, :: self.stride, :: self.stride]
        n, _, h, w = x.shape
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty(
            n, self.out_channels, h, w, dtype=x.dtype, device=x.device, memory_format=fmt
        )
        out.zero_()
        out[:, self.dst] = x[:, self.src]
        return out

    @staticmethod
    def tp_pruner() -> tp.BasePruningFunc:
        """A torch-pruning pruner for this module type.

        torch-pruning would trace the channel padding as an element-wise op and couple the channels
        of two stages one-to-one, which is wrong (and crashes). Pass
        ``customized_pruners={ShortcutA: ShortcutA.tp_pruner()}`` to ``tp.DependencyGraph`` or a
        ``tp.pruner`` so the shortcut's input and output channels are pruned independently. Code
        that cannot import this module finds the hook by duck typing: any module class with a
        ``tp_pruner`` attribute.
        """
        return _ShortcutAPruner()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _drop(keep: torch.Tensor, removed: Sequence[int]) -> torch.Tensor:
    """Renumber the channel ids in ``keep`` after the channels ``removed`` are deleted."""
    gone = torch.tensor(sorted(removed), dtype=keep.dtype, device=keep.device)
    return keep - torch.searchsorted(gone, keep)


def _remove(layer: ShortcutA, idxs: Sequence[int], *, side: str, other: str) -> int:
    """Delete channels ``idxs`` of one side ("src": inputs, "dst": outputs) of ``layer``'s
    mapping, and the channels they were paired with on the ``other``; returns how many."""
    removed = sorted({int(i) for i in idxs})
    ids = getattr(layer, side)
    keep = ~torch.isin(ids, torch.tensor(removed, device=ids.device))
    setattr(layer, side, _drop(ids[keep], removed))
    setattr(layer, other, getattr(layer, other)[keep])
    return len(removed)


class _ShortcutAPruner(tp.BasePruningFunc):
    """Prunes a :class:`ShortcutA`'s input or output channels; the two are not coupled.

    Removing input channel i drops it from the shortcut (its output slot becomes zero padding);
    removing output channel j drops the input that fed it (that input is then unused here).
    """

    TARGET_MODULES = (ShortcutA,)

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer.in_channels -= _remove(layer, idxs, side="src", other="dst")
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer.out_channels -= _remove(layer, idxs, side="dst", other="src")
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, section 4.2) with option-A shortcuts.

    Attributes:
        conv1, bn1, relu: the stem (3x3, 16 channels).
        layer1, layer2, layer3: ``n`` basic blocks each at 16, 32, 64 channels (stride 1, 2, 2).
        pool: global average pool.
        fc: the classifier.
    """

    def __init__(
        self, depth: int, num_classes: int = 10, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110), not {depth}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        stem = _scaled(16, width)
        self.conv1 = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        channels = stem
        stages = []
        for base, stride in ((16, 1), (32, 2), (64, 2)):
            out = _scaled(base, width)
            stage = [BasicBlock(channels, out, stride)]
            stage += [BasicBlock(out, out) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's convention)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ------------------------------------------------------------------------------- timm registry
def _check_options(name: str, pretrained: bool, width: float, kwargs: dict[str, Any]) -> None:
    """What every entrypoint rejects: weights, a width <= 0, options the model does not have."""
    if pretrained:
        raise ModelError(
            f"{name} has no pretrained weights (none exist offline): use pretrained=False"
        )
    if not width > 0:
        raise ModelError(f"{name}: width must be > 0, not {width}")
    unknown = sorted(set(kwargs) - _TIMM_BOOKKEEPING)
    if unknown:
        raise ModelError(f"{name} takes num_classes, in_chans and width; not {unknown[0]!r}")


def _entrypoint(name: str, build: Callable[..., nn.Module], doc: str) -> Callable[..., nn.Module]:
    """Register ``build`` in timm as ``name`` (its ``__name__``), behind the checks every
    entrypoint makes; timm calls it as ``entrypoint(pretrained=..., **kwargs)``. ``name`` must be
    in :data:`bench.names.CIFAR_MODELS`, where command lines look it up without importing this."""
    if name not in CIFAR_MODELS:
        raise ModelError(f"{name}: list it in bench.names.CIFAR_MODELS")

    def entrypoint(
        pretrained: bool = False,
        num_classes: int = 10,
        in_chans: int = 3,
        width: float = 1.0,
        **kwargs,
    ) -> nn.Module:
        _check_options(name, pretrained, width, kwargs)
        return build(num_classes=num_classes, in_chans=in_chans, width=width)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    return register_model(entrypoint)


vgg16_bn_cifar = _entrypoint(
    "vgg16_bn_cifar",
    CifarVGG,
    "VGG-16-BN for CIFAR (HRank / DCTPruning): 14.99M params, 313.46M MACs at 32 x 32.",
)
resnet20_cifar = _entrypoint(
    "resnet20_cifar",
    functools.partial(CifarResNet, 20),
    "ResNet-20 for CIFAR (He et al. 2016): 0.27M params, 40.55M MACs at 32 x 32.",
)
resnet56_cifar = _entrypoint(
    "resnet56_cifar",
    functools.partial(CifarResNet, 56),
    "ResNet-56 for CIFAR (He et al. 2016): 0.85M params, 125.49M MACs at 32 x 32.",
)
resnet110_cifar = _entrypoint(
    "resnet110_cifar",
    functools.partial(CifarResNet, 110),
    "ResNet-110 for CIFAR (He et al. 2016): 1.73M params, 252.89M MACs at 32 x 32.",
)


def cache_timm_names() -> None:
    """Write timm's own model names (deprecated aliases too: ``timm.is_model`` accepts them) for
    :mod:`bench.names`, once per timm version; done on import, so the next typo needs no timm."""
    names = getattr(_registry, "_model_entrypoints", None) or timm.list_models()
    write_timm_cache(set(names) - set(CIFAR_MODELS))


cache_timm_names()


def list_cifar_models() -> list[str]:
    """Names of the CIFAR models this module registers in timm, sorted."""
    return sorted(CIFAR_MODELS)


def canonical_width(width: float | None) -> float | None:
    """One value for the model's own width: None (``width: 1.0`` and no width build the same
    model, so they are one baseline, one key and one checkpoint)."""
    return None if width is None or width == 1.0 else width


def create_model(
    name: str, *, num_classes: int, in_chans: int, width: float | None = None
) -> nn.Module:
    """The harness's one way to build a model: any timm name, never with downloaded weights.

    Args:
        name: a timm model name; our CIFAR models are among them (see :func:`list_cifar_models`).
        num_classes: classifier outputs.
        in_chans: input image channels.
        width: channel multiplier, for our CIFAR models only (None = 1.0).

    Raises:
        ModelError: unknown name (with a did-you-mean), or ``width`` for a model that has none.
    """
    if not timm.is_model(name):
        raise ModelError(unknown_model_message(name, timm.list_models()))
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if name in CIFAR_MODELS:
        kwargs["width"] = 1.0 if width is None else width
    elif width is not None and width != 1.0:
        raise ModelError(
            f"width={width} works only for {', '.join(list_cifar_models())}; {name!r} has no "
            "width multiplier"
        )
    return timm.create_model(name, pretrained=False, **kwargs)
