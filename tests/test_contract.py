"""The method contract (bench.testing), parametrised over every registered method and model; and
proof that its checks bite: deliberately broken toy methods fail them."""

import pytest
from torch import nn

import methods
from bench.testing import CONTRACT_CHECKS, CONTRACT_MODELS, ContractCase
from methods._masks import apply_mask
from methods.base import CompressionMethod, MethodConfigError, register_method

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


# -- broken toys, registered only inside their test (tests/conftest.py forgets them after it)
class _ToyPruning(CompressionMethod):
    """Masks the first half of every conv's filters: meets no ratio, but a real compression."""

    family = "spatial"
    structured = False

    def compress(self, model, target, data, finetune):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                mask = module.weight.detach().clone().fill_(1.0)
                mask[: module.out_channels // 2] = 0.0
                apply_mask(module, mask)
        return model


def _fails(check: str, cls: type[CompressionMethod]) -> None:
    register_method(cls)
    case = ContractCase(cls.name, CONTRACT_MODELS["resnet"])
    with pytest.raises(AssertionError, match=cls.name):
        CONTRACT_CHECKS[check](case)


def test_a_freshly_initialised_model_fails_uses_dense_weights():
    class Fresh(_ToyPruning):
        name = "toy_fresh"

        def compress(self, model, target, data, finetune):
            for module in model.modules():  # ignores the dense weights: a new random net
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return super().compress(model, target, data, finetune)

    register_method(type("ToyHonest", (_ToyPruning,), {"name": "toy_honest"}))
    CONTRACT_CHECKS["uses_dense_weights"](ContractCase("toy_honest", CONTRACT_MODELS["resnet"]))
    _fails("uses_dense_weights", Fresh)


def test_a_type_error_for_an_unreachable_ratio_fails():
    class Raises(_ToyPruning):
        name = "toy_type_error"

        def compress(self, model, target, data, finetune):
            if target.ratio is not None and target.ratio > 100:
                raise TypeError("cannot")
            return super().compress(model, target, data, finetune)

    _fails("unreachable_ratio", Raises)
    _fails("unreachable_ratio", type("Silent", (_ToyPruning,), {"name": "toy_silent"}))


def test_layer_rates_are_accepted_or_refused_with_method_config_error():
    class Refuses(_ToyPruning):
        name = "toy_refuses"

        def compress(self, model, target, data, finetune):
            if target.layer_rates is not None:
                raise MethodConfigError("toy_refuses takes a ratio target, not layer rates")
            return super().compress(model, target, data, finetune)

    class Crashes(_ToyPruning):
        name = "toy_crashes"

        def compress(self, model, target, data, finetune):
            if target.layer_rates is not None:
                raise NotImplementedError
            return super().compress(model, target, data, finetune)

    register_method(Refuses)
    CONTRACT_CHECKS["layer_rates"](ContractCase("toy_refuses", CONTRACT_MODELS["resnet"]))
    _fails("layer_rates", Crashes)
