"""One dependency-graph trace, many pruned copies: ``copy_with_graph`` and the ratio solver on it.

The params-ratio bisection prunes about ten throw-away copies of the model. Copying the model
together with its torch-pruning graph must prune exactly like tracing each copy anew (the slow
path, kept as ``params_after`` without a graph): same parameters, same buffers, same outputs, same
solved filter counts. Models: the harness's ``vgg16_bn_cifar`` (width 0.25) and ``resnet20_cifar``
(width 0.5, option-A shortcuts with their custom torch-pruning pruner).
"""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

import bench.models
from methods._modules import example_input
from methods._structured import (
    ParamsCounter,
    build_graph,
    classify_layers,
    copy_with_graph,
    params_after,
    prunable_convs,
    prune_filters,
    solve_ratio,
)
from methods.base import Target, count_params

SHAPE = (3, 32, 32)


def paper_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """vgg16_bn_cifar (width 0.25) or resnet20_cifar (width 0.5) with non-trivial BN statistics."""
    torch.manual_seed(0)
    width = 0.25 if name.startswith("vgg") else 0.5
    model = bench.models.create_model(name, num_classes=10, in_chans=3, width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model, example_input(model, SHAPE)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Same parameter and buffer names, shapes and values (ShortcutA's index buffers included)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["vgg16_bn_cifar", "resnet20_cifar"])
def test_copy_with_graph_prunes_exactly_like_a_fresh_trace(name):
    model, example = paper_model(name)
    original = copy.deepcopy(model)
    graph = build_graph(model, example)
    names = [n for n, _ in prunable_convs(model, example, graph=graph)]
    if name.startswith("resnet"):
        # residual convs too: their groups run through the option-A shortcuts' custom pruner
        names += ["conv1", "layer2.0.conv2"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPE)
    for _ in range(3):
        keep = []
        for n in names:
            size = model.get_submodule(n).out_channels
            k = int(torch.randint(1, size + 1, (), generator=gen))
            keep.append(torch.randperm(size, generator=gen)[:k])
        fast, fast_graph = copy_with_graph(model, graph)
        assert fast_graph.model is fast and fast.get_submodule(names[0]) in fast_graph.module2node
        prune_filters(fast, example, names, keep, graph=fast_graph)
        slow = prune_filters(copy.deepcopy(model), example, names, keep)
        assert same_state(fast, slow)
        torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=0)
        counts = [len(k) for k in keep]
        assert params_after(model, example, names, counts, graph=graph) == count_params(slow)
        assert params_after(model, example, names, counts) == count_params(slow)
    if name.startswith("resnet"):
        assert fast.layer2[0].shortcut.in_channels < original.layer2[0].shortcut.in_channels
    # the original model and its graph are untouched: the graph still prunes the original right
    assert same_state(model, original)
    prune_filters(model, example, names, keep, graph=graph)
    assert same_state(model, slow)


def test_copy_with_graph_rejects_a_graph_of_another_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    graph = build_graph(model, torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="graph built on this very model"):
        copy_with_graph(copy.deepcopy(model), graph)


@pytest.mark.parametrize(
    ("name", "ratio", "allocation"),
    [("vgg16_bn_cifar", 2.0, "uniform"), ("resnet20_cifar", 1.5, "global")],
)
def test_solve_ratio_traces_once_and_matches_tracing_every_probe(
    monkeypatch, name, ratio, allocation
):
    model, example = paper_model(name)
    layers = prunable_convs(model, example)
    names = [n for n, _ in layers]
    scores = [conv.weight.detach().abs().sum(dim=(1, 2, 3)) for _, conv in layers]
    target = Target(ratio=ratio)
    traces = []
    build = tp.DependencyGraph.build_dependency

    def counted(self, *args, **kwargs):
        traces.append(1)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counted)
    fast = solve_ratio(model, example, names, scores, target, allocation=allocation, method="x")
    assert len(traces) == 1
    # the slow path: every probe deep-copies the model and traces the copy
    slow = solve_ratio(
        model,
        example,
        names,
        scores,
        target,
        allocation=allocation,
        method="x",
        params_of=lambda counts: params_after(model, example, names, counts),
    )
    assert len(traces) > 5
    assert fast == slow
    dense = count_params(model)
    assert abs(dense / params_after(model, example, names, fast) / ratio - 1) <= 0.02


COUNTED = [
    "vgg16_bn_cifar",
    "resnet20_cifar",  # option-A shortcuts with their custom pruner
    "regnetx_002",  # grouped convs: units in channel blocks
    "mobilenetv2_050",  # depthwise convs shrinking with their producers
    pytest.param("densenet121", marks=pytest.mark.slow),  # concatenations
    pytest.param("convnext_atto", marks=pytest.mark.slow),  # layer scale, LayerNorm
]


@pytest.mark.parametrize("name", COUNTED)
def test_params_counter_counts_what_surgery_leaves(name):
    if name.endswith("_cifar"):
        model, example = paper_model(name)
    else:
        torch.manual_seed(0)
        model = bench.models.create_model(name, num_classes=10, in_chans=3).eval()
        example = example_input(model, SHAPE)
    graph = build_graph(model, example)
    units = [r for r in classify_layers(model, example, graph=graph) if r.is_unit]
    names, blocks = [u.name for u in units], [u.channel_groups for u in units]
    counter = ParamsCounter(model, example, names, graph, blocks)
    gen = torch.Generator().manual_seed(1)
    trials = [[u.items for u in units], [1] * len(units)]  # dense, and as far as it goes
    trials += [[int(torch.randint(1, u.items + 1, (), generator=gen)) for u in units]]
    for counts in trials:
        real = params_after(model, example, names, counts, graph=graph, channel_groups=blocks)
        assert counter(counts) == real
    assert counter(trials[0]) == count_params(model)


def test_copy_with_graph_of_a_deep_network_does_not_recurse_through_it():
    # a plain deepcopy of ResNet-56's graph follows node links past Python's recursion limit
    model = bench.models.create_model("resnet56_cifar", num_classes=10, in_chans=3, width=0.25)
    example = example_input(model, SHAPE)
    graph = build_graph(model, example)
    clone, clone_graph = copy_with_graph(model, graph)
    prune_filters(clone, example, ["layer3.8.conv1"], [[0]], graph=clone_graph)
    assert clone.layer3[8].bn1.num_features == clone.layer3[8].conv2.in_channels == 1
    assert model.layer3[8].conv2.in_channels == 16
    assert clone(torch.randn(2, *SHAPE)).shape == (2, 10)
