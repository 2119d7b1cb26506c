"""Shared plumbing of the low-rank methods (``svd``, ``lrsd``, ``freq_lowrank``).

- Which layers can be factorised (``Conv2d``, ``Linear``) and their m x d views: a conv
  N x C x k x k is the matrix N x (C k^2), a linear layer is its weight. A grouped conv (g groups)
  is g matrices (N / g) x (C / g k^2), factorised per group at one shared rank r, for the methods
  that ask for it (``grouped=True``); it deploys as two grouped convs with g groups. A depthwise
  conv is never factorised: each of its groups is a 1 x k^2 matrix, whose rank-1 factors store
  more than it does. The layers a method leaves alone are noted on the model with the reason
  (:func:`note_unfactorised`), and appear in its layer table (:func:`rank_table`) and in the
  "out of reach" error, which says which layers keep the params left.
- The deployed form, :class:`LowRank`: a plain ``nn.Sequential`` of two ordinary layers, so
  ``FlopCounterMode`` and latency timers see the real work. A conv at rank r becomes
  ``Conv2d(C, r, k, stride, padding, dilation)`` then ``Conv2d(r, N, 1)`` (cost per output position
  r (C k^2 + N) instead of N C k^2); a linear m x d becomes ``Linear(d, r)`` then ``Linear(r, m)``.
  The original bias goes on the second layer.
- Rank allocation for a whole-model params ratio (:func:`allocate_ranks`): the same fraction of
  each layer's full rank (``uniform``) or one global singular-value energy threshold (``energy``;
  the policies live in :mod:`methods._allocation`), solved by bisection on that
  fraction/threshold and then topped up one rank at a time, so that the achieved
  ``count_params(dense) / count_params(compressed)`` lands within the target's tolerance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods._allocation import Allocation, get_allocation
from methods.base import CompressionWarning, MethodConfigError, Target

__all__ = [
    "LayerInfo",
    "LowRank",
    "RankPlan",
    "Unfactorised",
    "allocate_ranks",
    "balance",
    "build_lowrank",
    "conv_like",
    "factorisable_layers",
    "group_matrices",
    "layer_profiles",
    "limits_text",
    "lowest_params",
    "note_unfactorised",
    "out_of_reach",
    "rank_table",
    "set_module",
    "singular_values",
    "solve_fraction",
    "thin_svd",
    "truncated_svd",
    "unfactorised_layers",
    "warn_adjusted",
    "weight_matrix",
]


# ------------------------------------------------------------------------------------ layers
@dataclass(frozen=True)
class LayerInfo:
    """A factorisable layer: its qualified name and the m x d shape of its weight matrix.

    Attributes:
        name: qualified module name (``model.get_submodule(name)``).
        kind: "conv" or "linear".
        m: output channels / features (per group).
        d: C k^2 for a conv (per group: C / g k^2), input features for a linear layer.
        groups: the conv's groups g; each group is one m x d matrix, all factorised at one rank.
    """

    name: str
    kind: str
    m: int
    d: int
    groups: int = 1

    @property
    def full_rank(self) -> int:
        return min(self.m, self.d)

    @property
    def dense_params(self) -> int:
        """Weight values of the dense layer (the bias is the same dense or factorised)."""
        return self.groups * self.m * self.d

    def lowrank_params(self, rank: int) -> int:
        """Weight values of the two factors at ``rank`` (per group)."""
        return self.groups * rank * (self.m + self.d)

    def saves(self, rank: int) -> bool:
        """True when factorising at ``rank`` stores fewer values than the dense weight."""
        return self.lowrank_params(rank) < self.dense_params

    @property
    def max_saving_rank(self) -> int:
        """The largest rank that still saves parameters (0 when none does)."""
        return (self.m * self.d - 1) // (self.m + self.d)

    def cost(self, rank: int) -> int:
        """Weight values at ``rank``: the factors when they save, else the dense weight."""
        return self.lowrank_params(rank) if self.saves(rank) else self.dense_params


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.weight.shape[1] == 1


def factorisable_layers(
    model: nn.Module,
    *,
    include_linear: bool = True,
    spatial_only: bool = False,
    grouped: bool = False,
) -> list[LayerInfo]:
    """Conv2d and, unless excluded, Linear layers of ``model`` in module order.

    Args:
        include_linear: also list ``nn.Linear`` layers.
        spatial_only: list only convs whose kernel is larger than 1 x 1.
        grouped: also list grouped convs (factorised per group); depthwise convs never are.
    """
    layers = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            if include_linear and not spatial_only:
                layers.append(LayerInfo(name, "linear", module.out_features, module.in_features))
            continue
        if not isinstance(module, nn.Conv2d) or _is_depthwise(module):
            continue
        g = module.groups
        kh, kw = module.kernel_size
        if (g > 1 and not grouped) or (spatial_only and kh * kw == 1):
            continue
        m, d = module.out_channels // g, module.in_channels // g * kh * kw
        layers.append(LayerInfo(name, "conv", m, d, g))
    return layers


@dataclass(frozen=True)
class Unfactorised:
    """A conv or linear layer a low-rank method leaves dense, and why.

    Attributes:
        name: qualified module name.
        kind: "depthwise", "grouped", "pointwise" (a 1 x 1 conv) or "linear".
        params: its weight values.
        reason: the sentence for the layer table.
    """

    name: str
    kind: str
    params: int
    reason: str

    @property
    def structural(self) -> bool:
        """True when the layer's structure, not the method's layer choice, keeps it dense."""
        return self.kind in ("depthwise", "grouped")


# kind -> (one layer, several layers), for the "out of reach" message
_KINDS = {
    "depthwise": ("depthwise conv", "depthwise convs"),
    "grouped": ("grouped conv", "grouped convs"),
    "pointwise": ("1 x 1 conv", "1 x 1 convs"),
    "linear": ("linear layer", "linear layers"),
}


def unfactorised_layers(
    model: nn.Module, layers: Sequence[LayerInfo], method: str
) -> list[Unfactorised]:
    """Every conv and linear layer of ``model`` not among ``layers``, with the reason."""
    listed = {layer.name for layer in layers}
    out = []
    for name, module in model.named_modules():
        if name in listed or not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        params = module.weight.numel()
        if _is_depthwise(module):
            kind = "depthwise"
            reason = "depthwise: each group is a 1 x k^2 matrix; its factors would store more"
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            kind = "grouped"
            reason = f"grouped conv ({module.groups} groups): {method} factorises whole layers"
        elif isinstance(module, nn.Conv2d):
            kind, reason = "pointwise", f"1 x 1 conv: left out by {method}'s layer choice"
        else:
            kind, reason = "linear", f"linear layer: left out by {method}'s layer choice"
        out.append(Unfactorised(name, kind, params, reason))
    return out


# the attribute noted on each layer a method left dense for its structure (rank_table reads it)
_LEFT_ALONE = "lowrank_left_alone"


def note_unfactorised(model: nn.Module, unfactorised: Sequence[Unfactorised]) -> None:
    """Note on each structurally unfactorised layer why it stays dense (for :func:`rank_table`)."""
    for item in unfactorised:
        if item.structural:
            setattr(model.get_submodule(item.name), _LEFT_ALONE, item.reason)


def limits_text(unfactorised: Sequence[Unfactorised], floor: float, floor_factors: int) -> str:
    """What keeps the params of a model factorised at the lowest ranks, in one clause."""
    kinds: dict[str, list[Unfactorised]] = {}
    for item in unfactorised:
        kinds.setdefault(item.kind, []).append(item)
    parts = []
    for kind, items in sorted(kinds.items(), key=lambda kv: -sum(i.params for i in kv[1])):
        one, many = _KINDS[kind]
        what = f"{one} {items[0].name}" if len(items) == 1 else f"{len(items)} {many}"
        parts.append(f"{what} ({sum(i.params for i in items) / floor:.0%} of the params left)")
    parts.append(f"factorised layers at rank 1 ({floor_factors / floor:.0%})")
    rest = floor - floor_factors - sum(i.params for i in unfactorised)
    parts.append(f"norms, biases and other parameters ({rest / floor:.0%})")
    return "kept dense: " + ", ".join(parts)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The m x d view of a conv or linear weight (detached); a grouped conv's groups stacked."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def group_matrices(module: nn.Module) -> torch.Tensor:
    """The g x m x d view of a conv's weight, one matrix per group (g = 1 for a plain layer)."""
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``new``."""
    if not name:
        raise ValueError("cannot replace the root module; give a submodule name")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -------------------------------------------------------------------------------- deployment
class LowRank(nn.Sequential):
    """A factorised conv or linear layer: ``self[0]`` (r outputs, no bias), ``self[1]`` (r -> m).

    A plain ``nn.Sequential`` (same forward, same state-dict keys); the subclass only lets
    :func:`rank_table` find factorised layers and read their rank. A grouped conv's factors are
    two convs with its g groups, ``self[0]`` with g r outputs; ``rank`` is the rank per group.
    """

    @property
    def rank(self) -> int:
        first = self[0]
        if isinstance(first, nn.Conv2d):
            return first.out_channels // first.groups
        return first.out_features

    @property
    def groups(self) -> int:
        return getattr(self[0], "groups", 1)


def rank_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row ``{"layer", "rank"}`` per :class:`LowRank` layer of ``model`` (with ``groups``
    for a grouped one), then ``{"layer", "left_alone"}`` per layer left dense for its structure
    (:func:`note_unfactorised`), in module order."""
    rows: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, LowRank):
            row: dict[str, Any] = {"layer": name, "rank": module.rank}
            if module.groups > 1:
                row["groups"] = module.groups
            rows.append(row)
        elif isinstance(getattr(module, _LEFT_ALONE, None), str):
            rows.append({"layer": name, "left_alone": getattr(module, _LEFT_ALONE)})
    return rows


def conv_like(conv: nn.Conv2d, out_channels: int, *, bias: bool, groups: int = 1) -> nn.Conv2d:
    """A new conv with ``conv``'s inputs, kernel, stride, padding, dilation, padding mode, device
    and dtype, and ``out_channels`` filters in ``groups`` groups (weights freshly initialised)."""
    return nn.Conv2d(
        conv.in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=bias,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


@torch.no_grad()
def build_lowrank(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> LowRank:
    """The deployed form of ``module`` with weight matrix ``a @ b`` (a: m x r, b: r x d).

    The first layer keeps ``module``'s kernel size, stride, padding, dilation and padding mode;
    the second is a 1 x 1 conv (or linear) carrying ``module``'s bias. For a grouped conv, ``a``
    is g x m x r and ``b`` is g x r x d (group i's weight is ``a[i] @ b[i]``), and both convs
    have g groups.
    """
    weight = module.weight
    rank = a.shape[-1]
    kw = {"device": weight.device, "dtype": weight.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        g = module.groups
        first: nn.Module = conv_like(module, g * rank, bias=False, groups=g)
        second: nn.Module = nn.Conv2d(
            g * rank, module.out_channels, 1, groups=g, bias=has_bias, **kw
        )
        first.weight.copy_(b.reshape(g * rank, *weight.shape[1:]))
        second.weight.copy_(a.reshape(module.out_channels, rank, 1, 1))
    elif isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False, **kw)
        second = nn.Linear(rank, module.out_features, bias=has_bias, **kw)
        first.weight.copy_(b)
        second.weight.copy_(a)
    else:
        raise TypeError(f"cannot factorise a {type(module).__name__}; only Conv2d and Linear")
    if has_bias:
        second.bias.copy_(module.bias.detach())
    return LowRank(first, second)


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one term so column i of ``a`` and row i of ``b`` have equal norms.

    ``a @ b`` is unchanged; balanced factors train better than an orthonormal one and a large one.
    """
    na, nb = a.norm(dim=0), b.norm(dim=1)
    scale = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    return a * scale, b / scale.unsqueeze(1)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` (batched too), computed on whichever
    orientation is tall: LAPACK's divide and conquer on a wide 512 x 4608 float64 matrix takes
    2.7-9x as long here as on its transpose (benchmarks/svd_orientation.py)."""
    if matrix.shape[-2] >= matrix.shape[-1]:
        return tuple(torch.linalg.svd(matrix, full_matrices=False))
    u, s, vh = torch.linalg.svd(matrix.mT, full_matrices=False)
    return vh.mT, s, u.mT


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` on the tall orientation (see :func:`thin_svd`)."""
    if matrix.shape[-2] < matrix.shape[-1]:
        matrix = matrix.mT
    return torch.linalg.svdvals(matrix)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (a: m x r, b: r x d) of ``matrix`` by exact SVD, balanced."""
    u, s, vh = thin_svd(matrix)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


# -------------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class RankPlan:
    """Ranks for a list of layers.

    Attributes:
        ranks: one per layer; None where the layer stays dense.
        params: ``count_params`` of the model once these ranks are applied.
        clamped: names of layers whose rank was raised to 1.
        dense: names of layers left dense because factorising would not save parameters.
    """

    ranks: tuple[int | None, ...]
    params: int
    clamped: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()


def lowest_params(layers: Sequence[LayerInfo], total_params: int) -> int:
    """``count_params`` of the model with every layer of ``layers`` at rank 1 (or dense where
    rank 1 does not save): the fewest params factorising them can reach."""
    return (
        total_params
        + sum(min(la.lowrank_params(1), la.dense_params) for la in layers)
        - sum(la.dense_params for la in layers)
    )


def solve_fraction(params_at: Callable[[float], float], budget: float, *, steps: int = 50) -> float:
    """The largest t in [0, 1] with ``params_at(t) <= budget`` (``params_at`` non-decreasing).

    Bisection; the caller checks ``params_at(0) <= budget`` first (see :func:`out_of_reach`).
    """
    lo, hi = 0.0, 1.0
    if params_at(hi) <= budget:
        return hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if params_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def out_of_reach(
    method: str, ratio: float, best_ratio: float, limits: str = ""
) -> MethodConfigError:
    """The one-line error for a ratio beyond what ``method`` can reach on a model; ``limits``
    says which layers keep the params left."""
    why = f"; {limits}" if limits else ""
    return MethodConfigError(
        f"{method}: ratio {ratio:g} is out of reach on this model; the most it can reach is "
        f"{best_ratio:.3g}{why} (give a smaller ratio)"
    )


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def warn_adjusted(method: str, clamped: Sequence[str], dense: Sequence[str]) -> None:
    """Emit the CompressionWarnings for clamped ranks and layers left dense (one per kind)."""
    if clamped:
        warnings.warn(
            f"{method}: rank clamped to 1 in {len(clamped)} layer(s): {_names(clamped)}",
            CompressionWarning,
            stacklevel=3,
        )
    if dense:
        warnings.warn(
            f"{method}: {len(dense)} layer(s) left dense because factorising would not save "
            f"parameters: {_names(dense)}",
            CompressionWarning,
            stacklevel=3,
        )


def layer_profiles(
    policy: Allocation, spectra: Sequence[torch.Tensor] | None, n_layers: int
) -> list[torch.Tensor | None]:
    """Each layer's profile under ``policy`` (:meth:`Allocation.layer_profile`), computed once.

    Raises:
        ValueError: the policy needs a spectrum per layer and ``spectra`` does not give one.
    """
    if not policy.needs_spectrum:
        return [None] * n_layers
    if spectra is None or len(spectra) != n_layers:
        raise ValueError(f"{policy.name} allocation needs one singular-value spectrum per layer")
    return [policy.layer_profile(s) for s in spectra]


def allocate_ranks(
    layers: Sequence[LayerInfo],
    total_params: int,
    target: Target,
    *,
    allocation: str = "uniform",
    spectra: Sequence[torch.Tensor] | None = None,
    method: str = "low-rank",
    unfactorised: Sequence[Unfactorised] = (),
) -> RankPlan:
    """Ranks that meet ``target`` over the whole model's ``total_params`` (BN, biases, all).

    Args:
        layers: the layers that may be factorised.
        total_params: ``count_params`` of the dense model.
        target: a ratio (solved to within ``target.tolerance``) or per-layer rank reduction rates
            (rank = round((1 - rate) * full rank), one rate per layer).
        allocation: "uniform" (the same fraction of each layer's full rank) or "energy" (each layer
            keeps the smallest rank whose share of squared singular values reaches one global
            threshold); "energy" needs ``spectra``.
        spectra: singular values of each layer's matrix, descending (a grouped layer: their
            root mean square over its groups, so that rank r keeps the energy share that the
            top r of every group keep together).
        method: name used in errors and warnings.
        unfactorised: the layers left dense, named in the "out of reach" error.

    Raises:
        MethodConfigError: the ratio is out of reach, or cannot be met within tolerance, or the
            rates do not match the layer count.
    """
    policy = get_allocation(allocation, method=method)
    profiles = layer_profiles(policy, spectra, len(layers))

    def raw_ranks(t: float) -> list[int]:
        return [policy.rank_at(t, la.full_rank, p) for la, p in zip(layers, profiles)]

    def clamp(raw: list[int]) -> list[int]:
        return [min(max(r, 1), layer.full_rank) for r, layer in zip(raw, layers)]

    def weights_of(ranks: Sequence[int]) -> int:
        return sum(layer.cost(r) - layer.dense_params for r, layer in zip(ranks, layers))

    if target.layer_rates is not None:
        target.check_layer_count(len(layers), "factorisable layers")
        raw = [round((1.0 - p) * layer.full_rank) for p, layer in zip(target.layer_rates, layers)]
        ranks = clamp(raw)
    else:
        budget = total_params / target.ratio
        lowest = clamp(raw_ranks(0.0))
        floor = total_params + weights_of(lowest)
        if floor > budget:
            factors = sum(layer.cost(r) for r, layer in zip(lowest, layers))
            limits = limits_text(unfactorised, floor, factors)
            raise out_of_reach(method, target.ratio, total_params / floor, limits)
        t = solve_fraction(lambda t: total_params + weights_of(clamp(raw_ranks(t))), budget)
        raw = raw_ranks(t)
        room = budget - total_params - weights_of(clamp(raw))
        ranks = _fill(layers, clamp(raw), room, policy, profiles)
        achieved = total_params / (total_params + weights_of(ranks))
        if abs(achieved / target.ratio - 1.0) > target.tolerance:
            raise MethodConfigError(
                f"{method}: cannot meet ratio {target.ratio:g} within {target.tolerance:.0%} on "
                f"this model (closest {achieved:.3f}): its factorisable layers are too coarse"
            )
    plan = RankPlan(
        ranks=tuple(r if layer.saves(r) else None for r, layer in zip(ranks, layers)),
        params=total_params + weights_of(ranks),
        clamped=tuple(lay.name for r, lay, q in zip(raw, layers, ranks) if r < 1 and q == 1),
        dense=tuple(layer.name for r, layer in zip(ranks, layers) if not layer.saves(r)),
    )
    warn_adjusted(method, plan.clamped, plan.dense)
    return plan


def _fill(
    layers: Sequence[LayerInfo],
    ranks: list[int],
    room: float,
    policy: Allocation,
    profiles: Sequence[torch.Tensor | None],
) -> list[int]:
    """Raise ranks one step at a time while the next step fits in ``room`` (weight values).

    Bisection stops at a step of the params-vs-fraction staircase, where many layers may jump at
    once; this closes the gap. The policy's ``step_key`` says which layer goes first (uniform: the
    lowest rank fraction; energy: the next singular value holding the most energy). A step past the
    last saving rank makes the layer dense.
    """
    ranks = list(ranks)
    while True:
        best, best_key, best_cost = -1, math.inf, 0
        for i, (layer, r) in enumerate(zip(layers, ranks)):
            if not layer.saves(r):
                continue  # already dense
            nxt = r + 1 if layer.saves(r + 1) else layer.full_rank
            cost = layer.cost(nxt) - layer.cost(r)
            if cost > room:
                continue
            key = policy.step_key(r, nxt, layer.full_rank, profiles[i])
            if key < best_key:
                best, best_key, best_cost = i, key, cost
        if best < 0:
            return ranks
        layer = layers[best]
        ranks[best] = ranks[best] + 1 if layer.saves(ranks[best] + 1) else layer.full_rank
        room -= best_cost
