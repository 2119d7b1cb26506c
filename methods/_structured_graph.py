"""The *structure* half of structured (filter) pruning: which conv filters can go, and the surgery.

Everything here stands on torch-pruning's ``DependencyGraph``; nothing tracks dependencies by hand.
A unit of pruning is a conv's out-channel pruning group (the conv, its BN, what consumes its
channels; :func:`prunable_units`). A conv roots a unit unless

- it is depthwise: its filters follow its input channels, so it shrinks with the unit that
  produces them (torch-pruning prunes its in and out channels together);
- its group already belongs to an earlier unit (a squeeze-excitation gate, whose outputs multiply
  the unit's channels, is pruned with that unit);
- its group couples its outputs to another conv's or linear's outputs through a sum (it feeds a
  residual stream);
- it is the network's last conv in forward order (DCTPruning and HRank keep that one: VGG-16's
  ``[0.5]*7+[0.95]*5`` has 12 rates for 13 convs).

VGG-16-BN: 12 units; CIFAR ResNet-56: the first conv of each of its 27 basic blocks.

Grouped convs (ResNeXt, RegNet) are pruned as torch-pruning's ``MetaPruner`` prunes them: a unit
whose group touches a conv with ``groups = g`` (its out channels, or its in channels) has
``channel_groups = g`` (the least common multiple when several do) and its channels come in g
equal blocks; one *item* of the unit is the same position in every block, and items are what a
criterion ranks and a policy counts. Every block keeps at least one item, so no grouped conv is
ever left with zero channels per group, and every grouped conv keeps its ``groups``. (A grouped
conv reached through a concatenation offset is not handled: none of the timm CNNs we test has one.)

Custom layers that torch-pruning cannot trace correctly (the option-A shortcut of the CIFAR ResNets
zero-pads channels) bring their own pruner: any module class with a ``tp_pruner()`` static method is
registered as a torch-pruning customised pruner. It is found by duck typing because ``methods`` does
not import ``bench``.

Tracing a graph costs a forward pass with autograd plus torch-pruning's analysis; code that prunes
many throw-away copies of one model (the params-ratio bisection) traces once and copies the model
together with its graph (:func:`copy_with_graph`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from methods._modules import modules_in_run_order

__all__ = [
    "KEPT_WHOLE",
    "ConvRole",
    "build_graph",
    "classify_layers",
    "copy_with_graph",
    "describe_limits",
    "following_batchnorm",
    "is_depthwise",
    "prunable_convs",
    "prunable_units",
    "prune_filters",
]


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced on ``example``.

    Module classes with a ``tp_pruner()`` hook get that customised pruner. Tracing needs autograd
    and switches the model to eval mode; both are restored afterwards.
    """
    hooked = {type(m) for m in model.modules() if callable(getattr(m, "tp_pruner", None))}
    custom = {cls: cls.tp_pruner() for cls in hooked}
    was_training = model.training
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=custom, verbose=False
            )
    finally:
        model.train(was_training)


def copy_with_graph(
    model: nn.Module, graph: tp.DependencyGraph
) -> tuple[nn.Module, tp.DependencyGraph]:
    """A deep copy of ``model`` and a copy of ``graph`` that refers to the copied modules.

    Prunes exactly like tracing the copy anew, at the cost of a ``deepcopy`` instead of a trace
    (written here because torch-pruning offers no graph copy). Model and graph share one
    ``deepcopy`` memo, so every module the graph maps to a node, and every node's module, resolves
    to the same copied module. Shared with ``graph`` rather than copied:

    - the pruning functions: torch-pruning finds a dependency's trigger by identity with the
      global pruners (``tp.prune_conv_out_channels`` is a method of a module-level singleton);
      copied pruners would match nothing, and pruning a conv would no longer shrink its BN and
      successors. They hold no per-model state.
    - each node's autograd ``grad_fn``, read only while tracing (and not copyable);
    - the ``torch_pruning.ops`` module the graph keeps a reference to (modules cannot be copied).

    Raises:
        ValueError: ``graph`` was not built on ``model``.
    """
    if graph.model is not model:
        raise ValueError("copy_with_graph needs the graph built on this very model")
    nodes = list(graph.module2node.values())
    shared = [
        graph.ops,
        *graph.REGISTERED_PRUNERS.values(),
        *graph.CUSTOMIZED_PRUNERS.values(),
        *(node.grad_fn for node in nodes),
    ]
    memo = {id(obj): obj for obj in shared if obj is not None}
    # Nodes link to nodes (inputs, outputs, dependencies): a plain deepcopy follows those links
    # recursively, one chain through the whole network, and overflows Python's stack on
    # ResNet-56. A shallow copy of every node goes into the memo first, so each link is a memo
    # hit; its attributes are replaced by deep copies afterwards, one node at a time.
    for node in nodes:
        memo[id(node)] = copy.copy(node)
    model_copy, graph_copy = copy.deepcopy((model, graph), memo)
    for node in nodes:
        vars(memo[id(node)]).update(copy.deepcopy(vars(node), memo))
    return model_copy, graph_copy


def is_depthwise(conv: nn.Module) -> bool:
    """True for a depthwise conv (one filter per input channel), torch-pruning's own test."""
    return isinstance(conv, nn.Conv2d) and conv.groups == conv.out_channels > 1


# Why a layer's outputs are kept whole: key -> (one layer, several layers), for messages.
KEPT_WHOLE = {
    "residual": ("the conv feeding a residual sum", "convs feeding residual sums"),
    "last": ("the last conv", "last convs"),
    "linear": ("the linear layer", "linear layers"),
    "depthwise": ("the depthwise conv on unpruned channels", "depthwise convs on unpruned ones"),
    "indivisible": ("the conv whose channels do not split into its groups", "such convs"),
    "untraced": ("the conv torch-pruning cannot trace", "convs torch-pruning cannot trace"),
}


@dataclass(frozen=True)
class ConvRole:
    """What filter pruning does with one conv or linear layer (:func:`classify_layers`).

    Attributes:
        name: qualified module name.
        module: the layer.
        channel_groups: blocks its unit's channels come in (1 unless a grouped conv is coupled).
        kept: why its outputs are kept whole (a key of ``KEPT_WHOLE``), or None.
        pruned_with: the root of the unit that prunes its outputs (itself for a root), or None.
    """

    name: str
    module: nn.Module
    channel_groups: int = 1
    kept: str | None = None
    pruned_with: str | None = None

    @property
    def is_unit(self) -> bool:
        """True when this conv roots a unit of pruning (its filters are ranked and counted)."""
        return self.pruned_with == self.name

    @property
    def items(self) -> int:
        """Items of its unit: out channels per channel group."""
        return self.module.out_channels // self.channel_groups

    def channels(self, items: Iterable[int]) -> list[int]:
        """The out-channel indices of ``items`` (one per channel group each), ascending."""
        size = self.items
        return sorted(int(i) + g * size for i in items for g in range(self.channel_groups))

    def item_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-filter scores folded to per-item ones: the mean over the channel groups."""
        return scores.reshape(self.channel_groups, -1).mean(dim=0)


def _is_sum(module: nn.Module) -> bool:
    """An elementwise node of torch-pruning's graph that adds or subtracts its inputs."""
    if not isinstance(module, tp.ops._ElementWiseOp):
        return False
    return str(module._grad_fn).lower().startswith(("add", "sub"))


def _channel_groups(graph: tp.DependencyGraph, group: tp.Group) -> int:
    """Blocks a group's channels must shrink in: the lcm of its grouped layers' group counts.

    As torch-pruning's ``MetaPruner``: each layer's pruner says how many groups its in or out
    channels form (``groups`` of a conv, ``num_groups`` of a GroupNorm); depthwise convs are left
    out, they shrink their groups with their channels.
    """
    blocks = 1
    for dep, _ in group:
        module = dep.target.module
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or is_depthwise(module):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            n = getattr(pruner, "get_out_channel_groups", lambda m: 1)(module)
        else:
            n = getattr(pruner, "get_in_channel_groups", lambda m: 1)(module)
        blocks = math.lcm(blocks, int(n or 1))
    return blocks


def classify_layers(
    model: nn.Module, example: torch.Tensor, *, graph: tp.DependencyGraph | None = None
) -> list[ConvRole]:
    """The role of every conv (in forward order) and linear layer of ``model`` in filter pruning.

    See the module docstring for the rules; the units are the roles with ``is_unit``.
    """
    graph = graph if graph is not None else build_graph(model, example)
    convs = modules_in_run_order(model, example, (nn.Conv2d,))
    last = convs[-1][1] if convs else None
    owner: dict[nn.Module, str] = {}  # out-pruned module -> root of the unit that prunes it
    roles = []
    for name, conv in convs:
        if conv in owner:
            roles.append(ConvRole(name, conv, pruned_with=owner[conv]))
            continue
        if conv not in graph.module2node:
            roles.append(ConvRole(name, conv, kept="untraced"))
            continue
        if is_depthwise(conv):
            # not (yet) in a unit: its input channels come from a residual stream or the input
            roles.append(ConvRole(name, conv, kept="depthwise"))
            continue
        if conv is last:
            roles.append(ConvRole(name, conv, kept="last"))
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        producers = [
            dep.target.module
            for dep, _ in group
            if dep.target.module is not conv
            and isinstance(dep.target.module, tp.ops.TORCH_CONV | tp.ops.TORCH_LINEAR)
            and graph.is_out_channel_pruning_fn(dep.handler)
        ]
        sums = any(_is_sum(dep.target.module) for dep, _ in group)
        blocks = _channel_groups(graph, group)
        if sums and any(not is_depthwise(m) for m in producers):
            roles.append(ConvRole(name, conv, kept="residual"))
        elif conv.out_channels % blocks:
            roles.append(ConvRole(name, conv, kept="indivisible"))
        else:
            roles.append(ConvRole(name, conv, blocks, pruned_with=name))
            for module in producers:
                owner.setdefault(module, name)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            root = owner.get(module)
            kept = None if root is not None else "linear"
            roles.append(ConvRole(name, module, kept=kept, pruned_with=root))
    return roles


def prunable_units(
    model: nn.Module, example: torch.Tensor, *, graph: tp.DependencyGraph | None = None
) -> list[ConvRole]:
    """The convs that root a unit of pruning, in forward order (see the module docstring)."""
    return [role for role in classify_layers(model, example, graph=graph) if role.is_unit]


def prunable_convs(
    model: nn.Module, example: torch.Tensor, *, graph: tp.DependencyGraph | None = None
) -> list[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every unit root, in forward order (see the module docstring).

    Args:
        model: the dense model.
        example: an input batch used to trace the forward pass.
        graph: a dependency graph of ``model`` already built on ``example`` (built when None).
    """
    return [(role.name, role.module) for role in prunable_units(model, example, graph=graph)]


def describe_limits(pruned: nn.Module, roles: Sequence[ConvRole]) -> str:
    """Where the params of a model pruned as far as it goes are, in one line.

    ``roles`` are the dense model's (:func:`classify_layers`); layers kept whole are grouped by
    why, with their share of ``pruned``'s params, largest first, then what the pruned units keep.
    """
    total = sum(p.numel() for p in pruned.parameters())
    kept: dict[str, list[tuple[str, int]]] = {}
    pruned_params = 0
    by_name = {role.name: role for role in roles}
    for name, module in pruned.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        role = by_name.get(name)
        if own == 0 or not isinstance(module, nn.Conv2d | nn.Linear) or role is None:
            continue
        if role.kept is None:
            pruned_params += own
        else:
            kept.setdefault(role.kept, []).append((name, own))
    parts = []
    for why, layers in sorted(kept.items(), key=lambda item: -sum(n for _, n in item[1])):
        one, many = KEPT_WHOLE[why]
        what = f"{one} {layers[0][0]}" if len(layers) == 1 else f"{len(layers)} {many}"
        parts.append(f"{what} ({sum(n for _, n in layers) / total:.0%} of the params left)")
    others = total - pruned_params - sum(n for v in kept.values() for _, n in v)
    parts.append(f"pruned layers at their minimum ({pruned_params / total:.0%})")
    parts.append(f"norms and other parameters ({others / total:.0%})")
    return "kept: " + ", ".join(parts)


def following_batchnorm(graph: tp.DependencyGraph, conv: nn.Conv2d) -> nn.Module | None:
    """The BatchNorm that directly and only consumes ``conv``'s output, or None."""
    outputs = graph.module2node[conv].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, nn.modules.batchnorm._BatchNorm):
        return outputs[0].module
    return None


def prune_filters(
    model: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    keep: Sequence[torch.Tensor | Sequence[int]],
    *,
    graph: tp.DependencyGraph | None = None,
) -> nn.Module:
    """Physically remove every filter of ``names[l]`` not in ``keep[l]``, in place.

    torch-pruning shrinks the coupled layers (BN, the next conv's input channels, a linear's inputs)
    and keeps their weights for the kept channels. ``graph`` (built on ``model`` when None) must
    describe ``model`` as it is now; pruning updates both. Returns ``model``.
    """
    graph = graph if graph is not None else build_graph(model, example)
    for name, kept in zip(names, keep):
        conv = model.get_submodule(name)
        kept_set = {int(i) for i in kept}
        drop = [i for i in range(conv.out_channels) if i not in kept_set]
        if drop:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    _check_channels(model)
    return model


def _check_channels(model: nn.Module) -> None:
    """Raise when pruning left a conv with zero channels, or channels that do not split evenly
    into its groups (an internal error: the units are built so that this cannot happen)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and (
            min(module.in_channels, module.out_channels) < module.groups
            or module.in_channels % module.groups
            or module.out_channels % module.groups
            or module.weight.shape[1] == 0
        ):
            raise RuntimeError(
                f"filter pruning left {name} with {module.in_channels} -> "
                f"{module.out_channels} channels in {module.groups} groups"
            )
