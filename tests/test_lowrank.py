"""The shared low-rank plumbing: layer discovery, deployed forms, module swaps, rank allocation."""

import math
import warnings

import pytest
import torch
from conftest import fresh_vgg
from torch import nn

from methods._lowrank import (
    LayerInfo,
    LowRank,
    allocate_ranks,
    balance,
    build_lowrank,
    factorisable_layers,
    group_matrices,
    note_unfactorised,
    rank_table,
    set_module,
    solve_fraction,
    truncated_svd,
    unfactorised_layers,
    weight_matrix,
)
from methods._modules import modules_in_run_order
from methods.base import CompressionWarning, MethodConfigError, Target, count_params

_vgg = fresh_vgg  # a fresh copy of one seeded width-0.25 VGG-16-BN


class _Swapped(nn.Module):
    """Modules defined in one order, run in another; plus a grouped conv and a 1 x 1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 5)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(6, 10, (3, 5), stride=1, padding=(2, 1), dilation=2, bias=False),
        nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect"),
        nn.Linear(12, 7),
    ],
)
def test_build_lowrank_matches_the_dense_layer_with_weight_a_b(layer):
    torch.manual_seed(0)
    m, d = weight_matrix(layer).shape
    a, b = torch.randn(m, 3), torch.randn(3, d)
    factorised = build_lowrank(layer, a, b)
    dense = layer
    with torch.no_grad():
        dense.weight.copy_((a @ b).reshape(dense.weight.shape))
    x = torch.randn(2, 6, 9, 11) if isinstance(layer, nn.Conv2d) else torch.randn(4, 12)
    assert isinstance(factorised, LowRank) and factorised.rank == 3
    assert factorised[0].bias is None
    assert (factorised[1].bias is None) == (layer.bias is None)
    torch.testing.assert_close(factorised(x), dense(x), atol=1e-4, rtol=1e-4)
    assert count_params(factorised) == 3 * (m + d) + (0 if layer.bias is None else m)


def test_factorisable_layers_shapes_and_filters():
    model = _Swapped()
    names = {layer.name: layer for layer in factorisable_layers(model)}
    assert set(names) == {"head", "pointwise", "stem"}  # the grouped conv is not factorisable
    assert names["stem"] == LayerInfo("stem", "conv", 8, 27)
    assert names["head"] == LayerInfo("head", "linear", 5, 8)
    without_linear = factorisable_layers(model, include_linear=False)
    assert [lay.name for lay in without_linear] == ["pointwise", "stem"]
    assert [lay.name for lay in factorisable_layers(model, spatial_only=True)] == ["stem"]


def test_modules_in_run_order_follow_execution_not_definition():
    model = _Swapped().train()
    run = modules_in_run_order(model, torch.randn(1, 3, 8, 8), (nn.Conv2d, nn.Linear))
    assert [name for name, _ in run] == ["stem", "depthwise", "pointwise", "head"]
    assert run[0][1] is model.stem and model.training  # training mode restored
    names = {layer.name for layer in factorisable_layers(model)}
    assert [name for name, _ in run if name in names] == ["stem", "pointwise", "head"]


def test_set_module_replaces_nested_modules_and_refuses_the_root():
    model = _vgg()
    set_module(model, "features.3", nn.Identity())
    assert isinstance(model.features[3], nn.Identity)
    with pytest.raises(ValueError):
        set_module(model, "", nn.Identity())


def test_layerinfo_saving_rule():
    layer = LayerInfo("x", "conv", 16, 27)  # dense 432 weights, 43 per rank
    assert layer.full_rank == 16 and layer.max_saving_rank == 10
    assert layer.saves(10) and not layer.saves(11)
    assert layer.cost(11) == layer.dense_params == 432


def test_balance_keeps_the_product_and_equalises_norms():
    a, b = torch.randn(7, 3) * 10, torch.randn(3, 5) * 0.1
    a2, b2 = balance(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b)
    torch.testing.assert_close(a2.norm(dim=0), b2.norm(dim=1))


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(20, 30, dtype=torch.float64)
    a, b = truncated_svd(w, 4)
    s = torch.linalg.svdvals(w)
    assert math.isclose(float((w - a @ b).norm()), float(s[4:].norm()), rel_tol=1e-9)


def test_solve_fraction_finds_the_largest_feasible_point():
    t = solve_fraction(lambda t: 100 * t, 37.0)
    assert abs(t - 0.37) < 1e-9
    assert solve_fraction(lambda t: 1.0, 5.0) == 1.0


@pytest.mark.parametrize("allocation", ["uniform", "energy"])
@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_allocate_ranks_meets_the_ratio_within_tolerance(ratio, allocation):
    model = _vgg()
    layers = factorisable_layers(model)
    spectra = [torch.linalg.svdvals(weight_matrix(model.get_submodule(lay.name))) for lay in layers]
    total = count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        plan = allocate_ranks(
            layers, total, Target(ratio=ratio), allocation=allocation, spectra=spectra
        )
    assert abs(total / plan.params / ratio - 1) <= 0.02
    for rank, layer in zip(plan.ranks, layers):
        assert rank is None or (1 <= rank <= layer.max_saving_rank)
    if allocation == "uniform":  # one shared fraction: ranks track full rank (to the top-up step)
        fractions = [r / lay.full_rank for r, lay in zip(plan.ranks, layers) if r and lay.m > 32]
        assert max(fractions) - min(fractions) < 0.1


def test_energy_allocation_keeps_more_of_a_layer_whose_energy_is_spread():
    layers = [LayerInfo("peaked", "linear", 64, 64), LayerInfo("flat", "linear", 64, 64)]
    peaked = torch.cat([torch.full((4,), 10.0), torch.full((60,), 0.01)])
    flat = torch.ones(64)
    target = Target(ratio=4.0)
    plan = allocate_ranks(layers, 2 * 64 * 64, target, allocation="energy", spectra=[peaked, flat])
    assert plan.ranks[0] < plan.ranks[1]


def test_out_of_reach_ratio_is_a_one_line_error_naming_the_maximum():
    model = _vgg()
    layers = factorisable_layers(model)
    with pytest.raises(MethodConfigError, match=r"out of reach.*most it can reach is \d") as info:
        allocate_ranks(layers, count_params(model), Target(ratio=1000.0), method="svd")
    assert "\n" not in str(info.value) and str(info.value).startswith("svd:")


def test_layer_rates_set_ranks_and_warn_when_clamped_or_dense():
    layers = [LayerInfo("a", "conv", 16, 144), LayerInfo("b", "conv", 16, 144)]
    rates = Target(layer_rates=(0.99, 0.0))
    with pytest.warns(CompressionWarning) as record:
        plan = allocate_ranks(layers, 10_000, rates)
    messages = " | ".join(str(w.message) for w in record)
    assert "clamped to 1" in messages and "left dense" in messages
    assert plan.ranks == (1, None) and plan.clamped == ("a",) and plan.dense == ("b",)
    with pytest.raises(MethodConfigError, match="2 factorisable layers"):
        allocate_ranks(layers, 10_000, Target(layer_rates=(0.5,)))


def test_a_grouped_conv_factorises_per_group_into_two_grouped_convs():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3)  # 3 groups of 3 x (2 * 9)
    layers = factorisable_layers(nn.Sequential(conv), grouped=True)
    assert layers == [LayerInfo("0", "conv", 3, 18, 3)]
    assert layers[0].dense_params == conv.weight.numel() and layers[0].lowrank_params(2) == 126
    assert factorisable_layers(nn.Sequential(conv)) == []  # grouped=False: left out
    u, s, vh = torch.linalg.svd(group_matrices(conv), full_matrices=False)
    a, b = u * s.unsqueeze(1), vh  # full rank 3 per group: exact
    factorised = build_lowrank(conv, a, b)
    assert factorised.rank == 3 and factorised.groups == 3
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(factorised(x), conv(x), atol=1e-5, rtol=1e-5)


def test_depthwise_convs_are_left_alone_with_the_reason_in_the_table():
    model = _Swapped()
    layers = factorisable_layers(model, grouped=True)
    left = unfactorised_layers(model, layers, "svd")
    assert [(item.name, item.kind) for item in left] == [("depthwise", "depthwise")]
    note_unfactorised(model, left)
    assert rank_table(model) == [{"layer": "depthwise", "left_alone": left[0].reason}]
