"""Deployment passes for convs and factorised pairs: fold BatchNorm, then pick each pair's form.

- :func:`fold_batchnorm`: every BatchNorm fed directly by a conv (or linear) is folded into that
  layer's weight and bias (``torch.nn.utils.fusion``) and leaves the graph. A factorised pair
  (``methods._lowrank.LowRank``) then costs two convs instead of two convs and a BatchNorm pass
  over its output; the dense model is folded the same way, so speedups compare like with like.
- :func:`choose_factorised`: each pair runs in the fastest of its equivalent forms, timed at its
  own input on the target device: as factorised; with its rank zero-padded to a multiple of 8
  (oneDNN's blocked layouts); or recomposed into one dense layer ("stored factorised, executed
  dense": what is stored and counted stays the factors, :class:`Recomposed`).

Why hooks and not ``torch.fx``: fx's symbolic trace (``torch.fx.experimental.optimization.fuse``)
fails on models with data-dependent control flow (several timm families), while a conv feeding
a BatchNorm is visible in any eager forward pass: the BatchNorm's input *is* the conv's output
tensor. A pair whose conv output is also used elsewhere would fold wrongly, so the folded model's
outputs are compared with the original's and a mismatch undoes the fold (with a note).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from methods._lowrank import LowRank, set_module

__all__ = [
    "PaddedLowRank",
    "Recomposed",
    "choose_factorised",
    "fold_batchnorm",
    "recompose",
]

# a form must beat the factorised one by this much to replace it (timing noise)
_MARGIN = 0.05
_RANK_MULTIPLE = 8


# ------------------------------------------------------------------------------------ folding
def _producer_consumer_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(layer name, batchnorm name)`` for every BatchNorm whose input is a conv/linear output,
    both called exactly once in ``model(example)``."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []  # holds outputs alive so their ids are not reused
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after_layer(module, _args, out):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = module
            keep.append(out)

    def before_bn(module, args):
        calls[module] = calls.get(module, 0) + 1
        source = produced.get(id(args[0])) if args else None
        if source is not None:
            pairs.append((source, module))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(after_layer))
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            hooks.append(module.register_forward_pre_hook(before_bn))
    _run(model, example, hooks)
    return [
        (names[layer], names[bn])
        for layer, bn in pairs
        if calls[layer] == 1 and calls[bn] == 1 and _foldable(layer, bn)
    ]


def _run(model: nn.Module, example: torch.Tensor, hooks: list) -> None:
    """One forward pass of ``example`` without autograd, then the ``hooks`` removed."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False
    conv2d = isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    linear = isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
    return (conv2d or linear) and _after_bn(bn) is not None


def _after_bn(bn: nn.Module) -> nn.Module | None:
    """What replaces a folded BatchNorm: nothing, or the activation a timm ``BatchNormAct2d``
    applies after it; None for a BatchNorm subclass whose forward is not known here."""
    if type(bn) in (nn.BatchNorm2d, nn.BatchNorm1d):
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str]:
    """Fold, in place, every BatchNorm fed directly by a conv/linear of ``model`` (eval mode)
    into that layer; returns notes (empty unless a fold had to be undone)."""
    model.eval()
    example = _example(model, input_shape, 2)
    pairs = _producer_consumer_pairs(model, example)
    if not pairs:
        return {}
    before = model(example)
    saved = {name: model.get_submodule(name) for pair in pairs for name in pair}
    for layer_name, bn_name in pairs:
        layer, bn = saved[layer_name], saved[bn_name]
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        set_module(model, layer_name, fuse(layer, bn))
        set_module(model, bn_name, _after_bn(bn))
    after = model(example)
    if after.shape == before.shape and torch.allclose(after, before, rtol=1e-4, atol=1e-4):
        return {}
    for name, module in saved.items():  # a conv output used beside its BatchNorm: undo
        set_module(model, name, module)
    return {"model": f"BatchNorm not folded: folding changed the outputs by {_gap(after, before)}"}


def _gap(a: torch.Tensor, b: torch.Tensor) -> str:
    return "a shape" if a.shape != b.shape else f"{float((a - b).abs().max()):.1e}"


def _example(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape, generator=gen).to(device)


# ------------------------------------------------------------------------------ alternate forms
class Recomposed:
    """Mixin of a factorised pair executed as one dense layer: it stores the factors (what a
    checkpoint holds; the product is formed at load time), so params and bytes count those."""

    factor_values: int
    factor_bytes: int

    def stored_values(self) -> int:
        return self.factor_values

    def stored_bytes(self) -> int:
        return self.factor_bytes


class RecomposedConv2d(Recomposed, nn.Conv2d):
    """A factorised conv pair recomposed into one conv (see :class:`Recomposed`)."""


class RecomposedLinear(Recomposed, nn.Linear):
    """A factorised linear pair recomposed into one linear layer (see :class:`Recomposed`)."""


def _stored(module: nn.Module) -> tuple[int, int]:
    values = sum(p.numel() for p in module.parameters())
    return values, sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
def recompose(pair: LowRank) -> nn.Module:
    """``pair`` as one dense layer with the same outputs: the product of its factors."""
    first, second = pair[0], pair[1]
    values, nbytes = _stored(pair)
    has_bias = second.bias is not None
    if isinstance(first, nn.Linear):
        new: nn.Module = RecomposedLinear(
            first.in_features, second.out_features, bias=has_bias,
            device=first.weight.device, dtype=first.weight.dtype,
        )  # fmt: skip
        new.weight.copy_(second.weight @ first.weight)
    else:
        g, rank = first.groups, first.out_channels // first.groups
        new = RecomposedConv2d(
            first.in_channels, second.out_channels, first.kernel_size, stride=first.stride,
            padding=first.padding, dilation=first.dilation, groups=g, bias=has_bias,
            padding_mode=first.padding_mode, device=first.weight.device, dtype=first.weight.dtype,
        )  # fmt: skip
        out_per_group = second.out_channels // g
        a = second.weight.reshape(g, out_per_group, rank)
        b = first.weight.reshape(g, rank, -1)
        new.weight.copy_((a @ b).reshape(new.weight.shape))
    if has_bias:
        new.bias.copy_(second.bias)
    new.factor_values, new.factor_bytes = values, nbytes
    return new


class PaddedLowRank(LowRank):
    """A factorised pair whose rank is zero-padded (extra filters of the first conv are zero, as
    are the matching inputs of the second): same outputs; the zeros are not stored."""

    real_rank: int
    factor_values: int
    factor_bytes: int

    @property
    def rank(self) -> int:
        return self.real_rank

    def stored_values(self) -> int:
        return self.factor_values

    def stored_bytes(self) -> int:
        return self.factor_bytes


@torch.no_grad()
def pad_rank(pair: LowRank, multiple: int = _RANK_MULTIPLE) -> PaddedLowRank | None:
    """``pair`` with its rank padded up to a multiple of ``multiple``; None when it already is
    one, or for a grouped pair."""
    rank = pair.rank
    padded = math.ceil(rank / multiple) * multiple
    if padded == rank or pair.groups != 1:
        return None
    first, second = pair[0], pair[1]
    kw = {"device": first.weight.device, "dtype": first.weight.dtype}
    if isinstance(first, nn.Linear):
        new_first: nn.Module = nn.Linear(first.in_features, padded, bias=False, **kw)
        new_second: nn.Module = nn.Linear(
            padded, second.out_features, bias=second.bias is not None, **kw
        )
    else:
        new_first = nn.Conv2d(
            first.in_channels, padded, first.kernel_size, stride=first.stride,
            padding=first.padding, dilation=first.dilation, bias=False,
            padding_mode=first.padding_mode, **kw,
        )  # fmt: skip
        new_second = nn.Conv2d(padded, second.out_channels, 1, bias=second.bias is not None, **kw)
    new_first.weight.zero_()
    new_first.weight[:rank].copy_(first.weight)
    new_second.weight.zero_()
    new_second.weight[:, :rank].copy_(second.weight)
    if second.bias is not None:
        new_second.bias.copy_(second.bias)
    out = PaddedLowRank(new_first, new_second)
    out.real_rank = rank
    out.factor_values, out.factor_bytes = _stored(pair)
    return out


# ----------------------------------------------------------------------------------- choosing
def _candidates(pair: LowRank) -> Iterator[tuple[str, nn.Module]]:
    yield "factorised", pair
    padded = pad_rank(pair)
    if padded is not None:
        yield f"rank padded {pair.rank}->{padded[0].weight.shape[0]}", padded
    yield "recomposed dense", recompose(pair)


@torch.no_grad()
def choose_factorised(model: nn.Module, input_shape: tuple[int, ...], timing) -> dict[str, str]:
    """Replace, in place, each factorised pair of ``model`` by its fastest equivalent form, timed
    interleaved at the pair's real input (a batch of ``timing.batch_size`` on ``timing.device``,
    channels-last for convs on CPU, ``timing.threads``); returns a note per pair."""
    from bench.deploy.timing import layer_inputs, time_interleaved

    pairs = {n: m for n, m in model.named_modules() if isinstance(m, LowRank)}
    if not pairs:
        return {}
    device = torch.device(timing.device)
    model.to(device)
    inputs = layer_inputs(model, list(pairs), _example(model, input_shape, timing.batch_size))
    notes = {}
    for name, pair in pairs.items():
        if name not in inputs:
            continue
        forms = dict(_candidates(pair))
        ms = time_interleaved(forms, inputs[name], timing)
        best = min(ms, key=ms.get)
        if best != "factorised" and ms[best] < (1 - _MARGIN) * ms["factorised"]:
            set_module(model, name, forms[best])
        else:
            best = "factorised"
        timed = ", ".join(f"{label} {t:.3f} ms" for label, t in ms.items())
        notes[name] = f"{best} ({timed})"
    return notes
