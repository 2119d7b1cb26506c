"""The method base class, registry, targets and the parameter units."""

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from methods import base
from methods._masks import apply_mask, remove_masks
from methods.base import (
    CompressionMethod,
    LayerCountError,
    MethodConfigError,
    Target,
    count_params,
    parse_layer_rates,
    register_method,
    stored_params,
)


def test_parse_layer_rates_hrank_syntax():
    rates = parse_layer_rates("[0.5]*7+[0.95]*5")
    assert rates == (0.5,) * 7 + (0.95,) * 5
    assert parse_layer_rates("[0.]+[0.18]*3") == (0.0, 0.18, 0.18, 0.18)
    assert parse_layer_rates("0.1, 0.2") == (0.1, 0.2)


@pytest.mark.parametrize(
    "spec", ["[1.0]*2", "[-0.1]", "[0.5]*x", "__import__('os')", "", "[0.5]**2"]
)
def test_parse_layer_rates_rejects(spec):
    with pytest.raises(MethodConfigError) as err:
        parse_layer_rates(spec)
    assert "\n" not in str(err.value)


def test_target():
    assert Target.parse("4").ratio == 4.0
    assert Target.parse("[0.5]*2").layer_rates == (0.5, 0.5)
    with pytest.raises(MethodConfigError, match="> 1"):
        Target(ratio=1.0)
    with pytest.raises(LayerCountError, match="exactly 3") as err:
        Target.parse("[0.5]*2").check_layer_count(3)
    assert isinstance(err.value, MethodConfigError) and err.value.expected == 3
    assert Target.parse("[0.5]*2").label == "rates:0.5,0.5"


def test_stored_params_counts_masks_by_nonzeros():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    dense = count_params(model)
    mask = torch.ones(3, 4)
    mask[0] = 0
    apply_mask(model[0], mask)
    assert count_params(model) == dense
    assert stored_params(model) == dense - 4
    # the mask survives optimizer steps: masked weights stay exactly zero in the forward weight
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    assert torch.all(model[0].weight[0] == 0)
    remove_masks(model)
    assert stored_params(model) == dense  # baked: now a dense tensor with zeros


def test_stored_params_with_torch_prune():
    layer = nn.Linear(10, 10)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=30)
    assert stored_params(layer) == 110 - 30


def test_registry_rejects_duplicates_and_bad_classes():
    @register_method
    class Dummy(CompressionMethod):
        name = "dummy_test_method"
        family = "spatial"

        def __init__(self, alpha: float = 0.5) -> None:
            self.alpha = alpha

    # no clean-up here: tests/conftest.py forgets what a test registers (temporary_registry)
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Dummy2(CompressionMethod):
            name = "dummy_test_method"
            family = "spatial"

    with pytest.raises(ValueError, match="family"):

        @register_method
        class Bad(CompressionMethod):
            name = "bad_family"
            family = "temporal"

    with pytest.raises(ValueError, match="search_space"):

        @register_method
        class Bad2(CompressionMethod):
            name = "bad_space"
            family = "spatial"
            search_space = {"beta": None}

    m = base.create_method("dummy_test_method", alpha=0.25)
    assert m.hyperparameters() == {"alpha": 0.25}
    with pytest.raises(MethodConfigError, match="no hyperparameter 'beta'"):
        base.create_method("dummy_test_method", beta=1)
    with pytest.raises(MethodConfigError, match="did you mean 'dummy_test_method'"):
        base.get_method_class("dummy_test_methd")


def test_bake_parametrizations_is_safe_on_a_deep_copy():
    import copy

    from methods._masks import bake_parametrizations

    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    mask = torch.ones(3, 2, 3, 3)
    mask[0] = 0
    apply_mask(model[0], mask)
    x = torch.randn(1, 2, 5, 5)
    expected = model(x)
    baked = bake_parametrizations(copy.deepcopy(model))
    assert type(baked[0]) is nn.Conv2d and torch.equal(baked[0].weight[0], torch.zeros(2, 3, 3))
    assert torch.allclose(baked(x), expected)
    assert torch.allclose(model(x), expected)  # the original still works (shared class untouched)
    assert stored_params(model) == count_params(model) - 18
