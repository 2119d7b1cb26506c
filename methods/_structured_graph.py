"""The *structure* half of structured (filter) pruning: which conv filters can go, and the surgery.

Everything here stands on torch-pruning's ``DependencyGraph``; nothing tracks dependencies by hand.
A conv is prunable when it has ``groups == 1`` and its out-channel pruning group holds no other
conv's or linear's *output* channels (it does not feed a residual sum), and it is not the network's
last conv in forward order (DCTPruning and HRank keep that one: VGG-16's ``[0.5]*7+[0.95]*5`` has
12 rates for 13 convs). VGG-16-BN: 12 prunable convs; CIFAR ResNet-56: the first conv of each of
its 27 basic blocks.

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
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from methods._modules import modules_in_run_order

__all__ = [
    "build_graph",
    "copy_with_graph",
    "following_batchnorm",
    "prunable_convs",
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


def _feeds_residual(graph: tp.DependencyGraph, conv: nn.Conv2d) -> bool:
    """True when pruning ``conv``'s filters would also remove another conv's or linear's outputs."""
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    for dep, _ in group:
        target = dep.target.module
        if (
            target is not conv
            and isinstance(target, tp.ops.TORCH_CONV | tp.ops.TORCH_LINEAR)
            and graph.is_out_channel_pruning_fn(dep.handler)
        ):
            return True
    return False


def prunable_convs(
    model: nn.Module, example: torch.Tensor, *, graph: tp.DependencyGraph | None = None
) -> list[tuple[str, nn.Conv2d]]:
    """The convs whose filters can be removed, in forward order (see the module docstring).

    Args:
        model: the dense model.
        example: an input batch used to trace the forward pass.
        graph: a dependency graph of ``model`` already built on ``example`` (built when None).
    """
    graph = graph if graph is not None else build_graph(model, example)
    convs = modules_in_run_order(model, example, (nn.Conv2d,))
    # The network's last conv is kept whole, as in the released DCTPruning/HRank code.
    return [
        (name, conv)
        for name, conv in convs[:-1]
        if conv.groups == 1 and conv in graph.module2node and not _feeds_residual(graph, conv)
    ]


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
    return model
