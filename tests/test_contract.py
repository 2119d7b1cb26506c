"""The method contract (bench.testing), parametrised over every registered method and model."""

import pytest

import methods
from bench.testing import CONTRACT_CHECKS, CONTRACT_MODELS, ContractCase

MODEL_CHECKS = [name for name in CONTRACT_CHECKS if name != "hyperparameters"]


@pytest.mark.parametrize("method", methods.list_methods())
def test_hyperparameters(method):
    CONTRACT_CHECKS["hyperparameters"](ContractCase(method, CONTRACT_MODELS["vgg"]))


@pytest.mark.parametrize("check", MODEL_CHECKS)
@pytest.mark.parametrize("model", list(CONTRACT_MODELS))
@pytest.mark.parametrize("method", methods.list_methods())
def test_contract(method, model, check):
    CONTRACT_CHECKS[check](ContractCase(method, CONTRACT_MODELS[model]))


def test_every_method_is_in_the_suite():
    # the registry is the source of truth: at least the seven methods of the studies are there
    expected = {"magnitude", "l1_filter", "random", "dct_pruning", "freq_lowrank", "svd", "lrsd"}
    missing = expected - set(methods.list_methods())
    assert not missing, f"methods not registered: {sorted(missing)}"
