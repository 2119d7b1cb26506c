"""``svd``: truncated SVD per layer, deployed as two layers, ranks meeting the target ratio."""

import copy
import warnings

import pytest
import torch
from conftest import fresh_vgg
from torch import nn

from bench.testing import compress_quietly
from methods._lowrank import LowRank, factorisable_layers, weight_matrix
from methods.base import (
    CalibData,
    CompressionWarning,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    get_method_class,
    no_finetune,
)

DATA = CalibData.synthetic((3, 16, 16), 10, n_batches=1, batch_size=4)


_vgg = fresh_vgg  # a fresh copy of one seeded width-0.25 VGG-16-BN


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _compress(model: nn.Module, target: Target, **hyper) -> nn.Module:
    return compress_quietly(create_method("svd", **hyper), model, target, DATA, seed=None)


@pytest.mark.parametrize("allocation", ["uniform", "energy"])
@pytest.mark.parametrize("ratio", [2.0, 4.0])
@pytest.mark.parametrize("factory", [_vgg, _small], ids=["vgg16_bn_cifar", "small"])
def test_ratio_is_met_within_two_percent(factory, ratio, allocation):
    dense = factory()
    compressed = _compress(copy.deepcopy(dense), Target(ratio=ratio), allocation=allocation)
    achieved = count_params(dense) / count_params(compressed)
    assert abs(achieved / ratio - 1) <= 0.02
    x = torch.randn(2, 3, 16, 16)
    assert compressed(x).shape == dense(x).shape


def test_factors_are_the_truncated_svd_and_the_deployed_layers_compute_them():
    dense = _vgg()
    compressed = _compress(copy.deepcopy(dense), Target(ratio=4.0))
    factorised = [(n, m) for n, m in compressed.named_modules() if isinstance(m, LowRank)]
    assert len(factorised) >= 10
    for name, module in factorised:
        first, second = module
        product = second.weight.reshape(second.weight.shape[0], -1) @ first.weight.reshape(
            module.rank, -1
        )
        w = weight_matrix(dense.get_submodule(name)).double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = (u[:, : module.rank] * s[: module.rank]) @ vh[: module.rank]
        torch.testing.assert_close(product.double(), best, atol=1e-4, rtol=1e-4)
        # deployed (two layers) vs the undeployed product as one dense layer
        original = copy.deepcopy(dense.get_submodule(name))
        with torch.no_grad():
            original.weight.copy_(product.reshape(original.weight.shape))
        x = torch.randn(2, original.weight.shape[1], 8, 8) if first.weight.dim() == 4 else None
        if x is None:
            x = torch.randn(2, original.in_features)
        torch.testing.assert_close(module(x), original(x), atol=1e-4, rtol=1e-4)


def test_include_linear_false_leaves_linear_layers_dense():
    compressed = _compress(_vgg(), Target(ratio=2.0), include_linear=False)
    assert not any(isinstance(m, LowRank) for m in compressed.classifier)
    assert isinstance(compressed.classifier[0], nn.Linear)
    assert isinstance(compressed.features[3], LowRank)


def test_layer_rates_give_ranks_and_clamping_warns_without_crashing():
    model = _small()
    layers = factorisable_layers(model)  # conv 16x27, conv 32x144, conv 32x288, linear 10x32
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", CompressionWarning)
        compressed = create_method("svd").compress(
            model, Target(layer_rates=(0.5, 0.75, 0.999, 0.0)), DATA, no_finetune()
        )
    ranks = {n: m.rank for n, m in compressed.named_modules() if isinstance(m, LowRank)}
    assert ranks == {"0": 8, "3": 8, "5": 1}  # the linear layer at full rank would not save
    assert sorted(str(w.message) for w in record) == [
        "svd: 1 layer(s) left dense because factorising would not save parameters: 9",
        "svd: rank clamped to 1 in 1 layer(s): 5",
    ]
    assert len(layers) == 4
    table = create_method("svd").layer_table(compressed)
    assert table == [{"layer": n, "rank": r} for n, r in ranks.items()]
    with pytest.raises(MethodConfigError, match="4 factorisable layers"):
        create_method("svd").compress(_small(), Target(layer_rates=(0.5,)), DATA, no_finetune())


def test_out_of_reach_ratio_raises():
    with pytest.raises(MethodConfigError, match="out of reach"):
        _compress(_small(), Target(ratio=500.0))


def test_deterministic_and_hyperparameters_round_trip():
    a = _compress(_vgg(), Target(ratio=4.0), allocation="energy").state_dict()
    b = _compress(_vgg(), Target(ratio=4.0), allocation="energy").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    method = create_method("svd", allocation="energy", include_linear=False)
    assert method.hyperparameters() == {"allocation": "energy", "include_linear": False}
    space = get_method_class("svd").search_space
    assert "uniform" in space["allocation"].choices


@pytest.mark.parametrize("bad", [{"allocation": "greedy"}, {"include_linear": "yes"}, {"rank": 3}])
def test_bad_hyperparameters_raise_one_line_errors(bad):
    with pytest.raises(MethodConfigError) as info:
        create_method("svd", **bad)
    assert "\n" not in str(info.value)
