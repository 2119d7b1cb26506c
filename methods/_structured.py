"""Structured (filter) pruning plumbing shared by ``l1_filter``, ``random`` and ``dct_pruning``.

Three things kept apart, as in Torch-Pruning: the *structure* (which conv filters can go, and what
else must shrink with them: BN, the next conv's input channels, a linear layer's inputs), the
*criterion* (a per-filter importance score, supplied by each method) and the *policy* (how many
filters each layer keeps: explicit per-layer rates, or a params-ratio target solved by bisection
with a ``uniform`` or ``global`` allocation, :mod:`methods._allocation`).

The structure (which convs are prunable, the graph, the surgery) lives in
:mod:`methods._structured_graph` and is re-exported here; this module holds the policy, the ratio
solver and the :class:`StructuredPruning` base class. The policy counts *items*: a filter, or for a
layer coupled to grouped convs one filter per channel block (its g blocks shrink alike, so no group
is ever emptied); a criterion still scores filters, and a block's items are ranked by the mean
score of their filters (as torch-pruning's ``MetaPruner`` does).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from optuna.distributions import CategoricalDistribution
from torch import nn

from methods._allocation import get_allocation
from methods._modules import example_input, note_layers, noted_layers
from methods._structured_graph import (
    ConvRole,
    build_graph,
    classify_layers,
    copy_with_graph,
    describe_limits,
    following_batchnorm,
    prunable_convs,
    prunable_units,
    prune_filters,
)
from methods.base import (
    CalibData,
    CompressionMethod,
    Finetune,
    MethodConfigError,
    Target,
    count_params,
)

__all__ = [
    "ConvRole",
    "ParamsCounter",
    "PrunableModel",
    "StructuredPruning",
    "build_graph",
    "classify_layers",
    "copy_with_graph",
    "following_batchnorm",
    "kept_count",
    "params_after",
    "prunable_convs",
    "prunable_units",
    "prune_filters",
    "reinit_bn_and_classifier",
    "removal_order",
    "solve_ratio",
    "top_filters",
]

# Guards ceil(n * (1 - p)) against float noise: 100 * (1 - 0.7) = 30.000000000000004 must keep 30.
_CEIL_EPS = 1e-9
# The attribute that filter pruning notes on each conv it pruned (methods._modules.note_layers).
_NOTE = "filter_pruning"


# --------------------------------------------------------------------------------------- policy
def kept_count(n: int, rate: float) -> int:
    """Filters kept at pruning rate ``rate``: ``ceil(n * (1 - rate))``, at least 1."""
    return max(1, math.ceil(n * (1.0 - rate) - _CEIL_EPS))


def top_filters(scores: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Indices (ascending) of the ``counts[l]`` highest-scoring filters of each layer.

    Ties go to the lower index (stable sort), so equal scores give a deterministic choice.
    """
    keep = []
    for s, k in zip(scores, counts):
        order = torch.argsort(s.detach().cpu().double(), descending=True, stable=True)
        keep.append(order[:k].sort().values)
    return keep


def removal_order(scores: Sequence[torch.Tensor], allocation: str) -> list[int]:
    """The layer index of each successive single-filter removal (each layer keeps at least one).

    Within a layer, filters go in ascending score. Across layers, in ascending key of the
    ``allocation`` policy (:meth:`methods._allocation.Allocation.removal_keys`), ties to the lower
    layer:

    - ``uniform``: the j-th filter of an n-filter layer goes at rate j / n, so the first m removals
      interpolate between uniform rates one filter at a time;
    - ``global``: ascending score normalised by the layer's mean score (one global threshold;
      scores are non-negative, as L1 norms, energies and uniform draws are).
    """
    policy = get_allocation(allocation)
    keys = [(key, layer) for layer, s in enumerate(scores) for key in policy.removal_keys(s)]
    return [layer for _, layer in sorted(keys)]


# --------------------------------------------------------------------------------------- solving
def params_after(
    model: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    counts: Sequence[int],
    *,
    graph: tp.DependencyGraph | None = None,
    channel_groups: Sequence[int] | None = None,
) -> int:
    """``count_params`` of ``model`` with ``counts[l]`` items left in layer ``names[l]``.

    An item is a filter, or with ``channel_groups[l] = g > 1`` one filter in each of the layer's g
    channel blocks (:class:`methods._structured_graph.ConvRole`). Works on a deep copy: which
    filters go does not change the count, only how many. With ``graph`` (built on the unpruned
    ``model``, left untouched) the copy is pruned through a copy of it; without, the copy is traced
    anew, which costs far more (a forward pass with autograd and torch-pruning's analysis) and
    gives the same result.
    """
    return count_params(_pruned_copy(model, example, names, counts, graph, channel_groups))


def _pruned_copy(
    model: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    counts: Sequence[int],
    graph: tp.DependencyGraph | None,
    channel_groups: Sequence[int] | None,
) -> nn.Module:
    """A copy of ``model`` with the first ``counts[l]`` items of ``names[l]`` kept."""
    blocks = channel_groups if channel_groups is not None else [1] * len(names)
    keep = []
    for name, k, g in zip(names, counts, blocks):
        size = model.get_submodule(name).out_channels // g
        keep.append([i + b * size for b in range(g) for i in range(k)])
    if graph is None:
        clone = copy.deepcopy(model)
        prune_filters(clone, example, names, keep)
    else:
        clone, clone_graph = copy_with_graph(model, graph)
        prune_filters(clone, example, names, keep, graph=clone_graph)
    return clone


class ParamsCounter:
    """``count_params`` of ``model`` pruned to ``counts[l]`` items in unit ``names[l]``, by
    arithmetic on shapes instead of surgery: what :func:`params_after` says, without pruning a copy.

    Pruning removes whole index ranges of parameter dimensions: each item (a filter, or one filter
    per channel block) of a unit removes the same number of indices from each dimension it touches
    (its BN's channels, the next conv's inputs, a concatenation's slice, a linear's flattened
    features), so every dimension's size is affine in the items each unit removes and a tensor's
    size is the product of its dimensions. Built by one pass of surgery on a copy (``graph`` is the
    dependency graph of ``model``, neither is modified): one item out of each unit in turn, each
    parameter's shape change recorded. A model whose pruning maps items unevenly (a split of a
    unit's channels) breaks the premise: :func:`solve_ratio` checks its answer with real surgery.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        names: Sequence[str],
        graph: tp.DependencyGraph,
        channel_groups: Sequence[int] | None = None,
    ) -> None:
        blocks = channel_groups if channel_groups is not None else [1] * len(names)
        clone, clone_graph = copy_with_graph(model, graph)

        def shapes() -> np.ndarray:
            out = np.ones((len(self._names), 4), dtype=np.int64)
            params = dict(clone.named_parameters())
            for t, name in enumerate(self._names):
                shape = tuple(params[name].shape)
                out[t, : len(shape)] = shape
            return out

        self._names = [name for name, _ in clone.named_parameters()]
        if any(p.dim() > 4 for p in clone.parameters()):
            raise ValueError("ParamsCounter handles parameters of up to 4 dimensions")
        self.items = np.array(
            [model.get_submodule(n).out_channels // g for n, g in zip(names, blocks)],
            dtype=np.int64,
        )
        self._sizes = shapes()
        # per unit: indices each parameter dimension loses per item the unit removes
        self._per_item = np.zeros((len(names), *self._sizes.shape), dtype=np.int64)
        before = self._sizes
        for u, (name, g, n) in enumerate(zip(names, blocks, self.items)):
            if n < 2:  # every unit keeps one item: this one never loses any
                continue
            size = model.get_submodule(name).out_channels // g
            drop = {n - 1 + b * size for b in range(g)}  # its last item, in every block
            keep = [i for i in range(g * size) if i not in drop]
            prune_filters(clone, example, [name], [keep], graph=clone_graph)
            after = shapes()
            self._per_item[u] = before - after
            before = after

    def __call__(self, counts: Sequence[int]) -> int:
        removed = self.items - np.asarray(counts, dtype=np.int64)
        sizes = self._sizes - np.tensordot(removed, self._per_item, axes=1)
        return int(sizes.prod(axis=1).sum())


def solve_ratio(
    model: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    scores: Sequence[torch.Tensor],
    target: Target,
    *,
    allocation: str,
    method: str,
    graph: tp.DependencyGraph | None = None,
    channel_groups: Sequence[int] | None = None,
    roles: Sequence[ConvRole] | None = None,
    params_of: Callable[[tuple[int, ...]], int] | None = None,
) -> list[int]:
    """Items (filters, or filter blocks: :func:`params_after`) to keep per layer so that dense /
    pruned params hits ``target.ratio``; ``scores`` has one entry per item.

    Bisection over the number m of single-filter removals taken from :func:`removal_order`: params
    fall monotonically with m, and each step removes one filter. When the step across the target
    is too coarse for the tolerance (small models, one wide layer), one filter is added back to or
    taken from each layer in turn and the closest of those candidates wins. Each probe counts the
    params by :class:`ParamsCounter` on ``graph`` (the dependency graph of ``model`` on ``example``,
    traced once here when None; neither is modified) and the answer is checked by pruning a copy
    (:func:`params_after`): where they disagree, the search runs again on real surgery for every
    probe. ``params_of`` (counts -> params) replaces both.

    Raises:
        MethodConfigError: the ratio is beyond what pruning every prunable layer to one item
            reaches (the message says where the params left are, from ``roles``: the dense
            model's :func:`classify_layers`, traced when None), or no candidate lands within the
            tolerance.
    """
    if target.ratio is None:
        raise ValueError("solve_ratio needs a ratio target")
    graph = graph if graph is not None else build_graph(model, example)

    def surgery(counts: tuple[int, ...]) -> int:
        return params_after(
            model, example, names, counts, graph=graph, channel_groups=channel_groups
        )

    args = (model, example, names, scores, target, allocation, method, graph, channel_groups)
    if params_of is not None:
        return _solve(*args, roles, params_of)
    counter = ParamsCounter(model, example, names, graph, channel_groups)
    counts = _solve(*args, roles, counter)
    if counter(tuple(counts)) == surgery(tuple(counts)):
        return counts
    return _solve(*args, roles, surgery)  # uneven pruning (see ParamsCounter): the slow way


def _solve(
    model, example, names, scores, target, allocation, method, graph, channel_groups, roles,
    params_of,
) -> list[int]:  # fmt: skip
    """:func:`solve_ratio`'s search, counting params with ``params_of``."""
    goal = target.ratio
    dense = count_params(model)
    sizes = [len(s) for s in scores]
    order = removal_order(scores, allocation)
    cache: dict[tuple[int, ...], float] = {}

    def counts_at(m: int) -> tuple[int, ...]:
        counts = list(sizes)
        for layer in order[:m]:
            counts[layer] -= 1
        return tuple(counts)

    def ratio_of(counts: tuple[int, ...]) -> float:
        if counts not in cache:
            cache[counts] = dense / params_of(counts)
        return cache[counts]

    def error(counts: tuple[int, ...]) -> float:
        return abs(ratio_of(counts) / goal - 1.0)

    most = ratio_of(counts_at(len(order)))
    if most < goal and abs(most / goal - 1.0) > target.tolerance:
        floor = _pruned_copy(model, example, names, counts_at(len(order)), graph, channel_groups)
        roles = roles if roles is not None else classify_layers(model, example, graph=graph)
        raise MethodConfigError(
            f"ratio {goal:g} is out of reach for {method} on this model: structured "
            f"pruning of its {len(names)} prunable layers reaches at most {most:.2f}x; "
            f"{describe_limits(floor, roles)}"
        )
    lo, hi = 0, len(order)  # invariant: ratio(lo) < goal <= ratio(hi), or hi is the end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ratio_of(counts_at(mid)) >= goal:
            hi = mid
        else:
            lo = mid
    below, above = counts_at(lo), counts_at(hi)
    best = min((below, above), key=error)
    if error(best) > target.tolerance:
        # one filter back into `above` (shrinks the ratio a little) or out of `below` (grows it)
        nudged = [
            tuple(k + (i == layer) for i, k in enumerate(above))
            for layer in range(len(sizes))
            if above[layer] < sizes[layer]
        ] + [
            tuple(k - (i == layer) for i, k in enumerate(below))
            for layer in range(len(sizes))
            if below[layer] > 1
        ]
        best = min([best, *nudged], key=error)
    if error(best) > target.tolerance:
        near = ", ".join(f"{ratio_of(c):.3g}x" for c in (below, above))
        raise MethodConfigError(
            f"ratio {goal:g} cannot be met within {target.tolerance:.0%} by {method} on "
            f"this model: removing one filter more or less gives {near}"
        )
    return list(best)


def reinit_bn_and_classifier(model: nn.Module) -> None:
    """Reset every BatchNorm (affine and running stats) and every Linear layer to its init.

    The released DCTPruning/HRank code builds the pruned model afresh and copies only the kept conv
    weights; this reproduces that quirk on the pruned model. Uses the global torch RNG.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Linear):
            module.reset_parameters()


# --------------------------------------------------------------------------------------- method
@dataclass(frozen=True)
class PrunableModel:
    """What a filter criterion may look at (:meth:`StructuredPruning.filter_scores`).

    Attributes:
        model: the dense model, unpruned, in eval mode.
        layers: its prunable convs ``(name, conv)`` in forward order; one score vector each.
        data: training-split calibration batches.
        graph: torch-pruning's dependency graph of ``model`` (e.g. which BN follows a conv).
    """

    model: nn.Module
    layers: Sequence[tuple[str, nn.Conv2d]]
    data: CalibData
    graph: tp.DependencyGraph


class StructuredPruning(CompressionMethod):
    """Base of the filter-pruning methods: subclasses give a criterion, this class does the rest.

    Subclasses implement :meth:`filter_scores`; one with more arguments than ``allocation`` checks
    and stores them in its own ``__init__`` and calls ``super().__init__(allocation)`` (and may set
    ``self.reinit_bn``). ``compress`` then finds the prunable convs, scores them, picks the items
    (per-layer rates when the target has them, else the ratio solved by bisection under
    ``allocation``; explicit rates ignore ``allocation``), removes the rest with torch-pruning, and
    notes on each pruned conv its filter count before pruning (read back by :meth:`layer_table`).
    A ratio out of reach raises a one-line error saying which layers keep the params left.

    Args:
        allocation: ``"uniform"`` (one rate for all prunable layers) or ``"global"`` (one
            threshold over scores divided by their layer's mean score); ratio targets only.
    """

    structured = True
    allocations = ("uniform", "global")
    search_space = {"allocation": CategoricalDistribution(list(allocations))}
    reinit_bn: bool = False

    def __init__(self, allocation: str = "uniform") -> None:
        get_allocation(allocation, method=self.name, supported=self.allocations)
        self.allocation = allocation

    def filter_scores(self, prunable: PrunableModel) -> list[torch.Tensor]:
        """Per prunable layer, one non-negative score per filter (a 1-D tensor; higher = keep)."""
        raise NotImplementedError

    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        example = example_input(model, data.input_shape)
        graph = build_graph(model, example)
        roles = classify_layers(model, example, graph=graph)
        units = [role for role in roles if role.is_unit]
        if not units:
            raise MethodConfigError(
                f"{self.name} found no prunable conv in this model (not depthwise, not feeding a "
                "residual sum, not the last conv)"
            )
        target.check_layer_count(len(units), "prunable convs")
        names = [unit.name for unit in units]
        layers = [(unit.name, unit.module) for unit in units]
        blocks = [unit.channel_groups for unit in units]
        prunable = PrunableModel(model, layers, data, graph)
        scores = [s.detach().double().cpu() for s in self.filter_scores(prunable)]
        for unit, s in zip(units, scores):
            n = unit.module.out_channels
            if s.shape != (n,):
                raise RuntimeError(
                    f"{self.name}: {unit.name} has {n} filters but {tuple(s.shape)} scores"
                )
        # a grouped unit ranks items (one filter per channel block) by their blocks' mean score
        item_scores = [unit.item_scores(s) for unit, s in zip(units, scores)]
        if target.layer_rates is not None:
            counts = [kept_count(u.items, p) for u, p in zip(units, target.layer_rates)]
        else:
            counts = solve_ratio(
                model,
                example,
                names,
                item_scores,
                target,
                allocation=self.allocation,
                method=self.name,
                graph=graph,
                channel_groups=blocks,
                roles=roles,
            )
        facts = [
            {"filters_before": u.module.out_channels, "channel_groups": u.channel_groups}
            for u in units
        ]
        keep = [u.channels(k) for u, k in zip(units, top_filters(item_scores, counts))]
        prune_filters(model, example, names, keep, graph=graph)
        if self.reinit_bn:
            reinit_bn_and_classifier(model)
        note_layers(layers, _NOTE, facts)
        return model

    def layer_table(self, model: nn.Module) -> list[dict[str, object]]:
        """One row per conv that filter pruning pruned in ``model``: filters before and after,
        and the channel blocks they were pruned in (1 unless grouped convs are coupled)."""
        rows = []
        for name, conv, facts in noted_layers(model, _NOTE):
            before, after = facts["filters_before"], conv.out_channels
            rows.append(
                {
                    "layer": name,
                    "filters_before": before,
                    "filters_after": after,
                    "pruned_fraction": 1 - after / before,
                    "channel_groups": facts.get("channel_groups", 1),
                }
            )
        return rows
