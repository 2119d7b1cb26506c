"""The contract suite every registered compression method must pass (like ``optuna.testing``).

Each check is a plain function ``check_*(case)`` that raises ``AssertionError`` with a message
naming the method; ``tests/test_contract.py`` parametrises them over ``list_methods()`` x
``CONTRACT_MODELS``, so a new method is tested without anyone writing a new test. Plugin authors
can call :func:`run_contract` on their own method, and register toy methods for their own tests
inside :func:`temporary_registry`.

What the contract asks of a method (docs/design.md, "Methods"):

- the achieved params ratio meets the target within its tolerance (stored params for unstructured);
- outputs are finite and keep their shape;
- the same seed gives the same compressed model;
- the compressed model depends on the dense weights: two dense models with different weights,
  compressed under the same seed (without fine-tuning), give different outputs (a method that
  returns a freshly initialised net fails);
- per-layer rates (HRank style, ``Target(layer_rates=...)``) of the right length are either
  accepted (finite outputs, same shape, fewer stored params than dense) or refused with a one-line
  ``MethodConfigError``; a wrong length is refused with ``LayerCountError``;
- an unreachable ratio (1e6) raises a one-line ``MethodConfigError``, no other exception;
- the deployable model the harness times (``bench.footprint.deployable``: a copy with every
  parametrisation baked in) gives the compressed model's outputs (to 1e-4), and baking it leaves
  the compressed model as it was;
- the deployed model exports to ONNX and ONNX Runtime gives its outputs (to 1e-4);
- hyperparameters round-trip through ``create_method``, and ``search_space`` names ``__init__``
  arguments whose defaults lie inside their distributions;
- the compressed state (masks, fixed patterns, shapes) survives fine-tuning.

The models, data and fine-tuning the checks run on are in ``bench/_contract_case.py``; the checks
of one case share one compression there, so the suite stays fast (determinism compresses again).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

from bench._contract_case import CONTRACT_MODELS, ContractCase, SyntheticFinetune
from bench.footprint import deployable
from methods import base
from methods.base import (
    CalibData,
    CompressionMethod,
    CompressionWarning,
    Finetune,
    LayerCountError,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    get_method_class,
    no_finetune,
    stored_params,
)

__all__ = [
    "CONTRACT_CHECKS",
    "CONTRACT_MODELS",
    "ContractCase",
    "SyntheticFinetune",
    "compress_quietly",
    "run_contract",
    "temporary_registry",
]


@contextlib.contextmanager
def temporary_registry() -> Iterator[None]:
    """Forget, at the end of the block, every method registered inside it.

    For tests that register a toy method or import a plugin in-process: the registry is restored
    to what it was, and the modules of the methods registered inside are dropped from
    ``sys.modules``, so importing the plugin again (``--plugin``) registers it again.
    """
    base.list_methods()  # the package's methods are registered before the snapshot
    before = dict(base._REGISTRY)
    modules = set(sys.modules)
    try:
        yield
    finally:
        added = [cls for name, cls in base._REGISTRY.items() if before.get(name) is not cls]
        base._REGISTRY.clear()
        base._REGISTRY.update(before)
        for cls in added:
            if cls.__module__ not in modules:
                sys.modules.pop(cls.__module__, None)


def compress_quietly(
    method: CompressionMethod,
    model: nn.Module,
    target: Target,
    data: CalibData,
    finetune: Finetune | None = None,
    *,
    seed: int | None = 0,
) -> nn.Module:
    """``method.compress`` for tests and benchmarks: under ``torch.manual_seed(seed)`` (None: not
    seeded), ``CompressionWarning`` silenced, and no fine-tuning unless ``finetune`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        finetune = finetune if finetune is not None else no_finetune()
        return method.compress(model, target, data, finetune)


def _achieved(dense: nn.Module, compressed: nn.Module) -> float:
    return count_params(dense) / stored_params(compressed)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def check_ratio(case: ContractCase) -> None:
    _, dense, compressed = case.compress()
    achieved = _achieved(dense, compressed)
    assert abs(achieved / case.ratio - 1) <= Target(ratio=case.ratio).tolerance + 1e-9, (
        f"{case.method}: achieved params ratio {achieved:.3f}, target {case.ratio}"
    )
    if get_method_class(case.method).structured:
        dense_ratio = count_params(dense) / count_params(compressed)
        assert dense_ratio > 1.0, (
            f"{case.method} is structured but its dense param count did not drop"
        )


def _check_finite_and_shaped(case: ContractCase, dense: nn.Module, compressed: nn.Module) -> None:
    x = case.probe()
    y_dense, y = _outputs(dense, x), _outputs(compressed, x)
    assert y.shape == y_dense.shape, f"{case.method}: output shape {y.shape} != {y_dense.shape}"
    assert torch.isfinite(y).all(), f"{case.method}: non-finite outputs"


def check_outputs(case: ContractCase) -> None:
    _, dense, compressed = case.compress()
    _check_finite_and_shaped(case, dense, compressed)


def check_determinism(case: ContractCase) -> None:
    x = case.probe()
    outs = [_outputs(case.compress(fresh=fresh)[2], x) for fresh in (False, True)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (
        f"{case.method}: two compressions under the same seed differ"
    )


def check_uses_dense_weights(case: ContractCase) -> None:
    x = case.probe()
    outs = []
    for weights in (0, 1):  # two dense models, the same compression seed, no training
        _, _, compressed = case.compress_with(
            Target(ratio=case.ratio), seed=0, weights=weights, finetune=no_finetune()
        )
        outs.append(_outputs(compressed, x))
    assert not torch.allclose(outs[0], outs[1], atol=1e-5), (
        f"{case.method}: dense models with different weights compress to the same outputs: "
        "the compressed model must be built from the dense weights, not freshly initialised"
    )


def _one_line(case: ContractCase, err: MethodConfigError, what: str) -> None:
    assert "\n" not in str(err).strip(), (
        f"{case.method}: the MethodConfigError for {what} is not one line: {err}"
    )


def check_layer_rates(case: ContractCase) -> None:
    # the right count is learnt from the method itself: one rate first, then what it asks for
    rates: tuple[float, ...] = (0.5,)
    for attempt in range(2):
        try:
            _, dense, compressed = case.compress_with(Target(layer_rates=rates))
        except LayerCountError as err:
            assert attempt == 0, f"{case.method}: asked for {len(rates)} layer rates, then: {err}"
            _one_line(case, err, "a wrong number of layer rates")
            rates = (0.5,) * err.expected
            continue
        except MethodConfigError as err:  # the method does not take layer rates: allowed
            _one_line(case, err, "layer rates")
            return
        except Exception as err:
            raise AssertionError(
                f"{case.method}: layer rates {list(rates)} raised {type(err).__name__} ({err}); "
                "accept them or refuse them with MethodConfigError"
            ) from err
        _check_finite_and_shaped(case, dense, compressed)
        assert stored_params(compressed) < count_params(dense), (
            f"{case.method}: layer rates {list(rates)} stored no fewer params than dense"
        )
        return


def check_unreachable_ratio(case: ContractCase) -> None:
    ratio = 1e6
    try:
        case.compress_with(Target(ratio=ratio), finetune=no_finetune())
    except MethodConfigError as err:
        _one_line(case, err, f"ratio {ratio:g}")
        return
    except Exception as err:
        raise AssertionError(
            f"{case.method}: ratio {ratio:g} raised {type(err).__name__} ({err}), "
            "not MethodConfigError"
        ) from err
    raise AssertionError(f"{case.method}: ratio {ratio:g} is out of reach but nothing was raised")


def check_deployed_outputs(case: ContractCase) -> None:
    _, _, compressed = case.compress()
    x = case.probe()
    before = _outputs(compressed, x)
    deployed = _outputs(deployable(compressed), x)
    assert torch.allclose(deployed, before, rtol=1e-4, atol=1e-4), (
        f"{case.method}: the deployed model's outputs differ from the compressed model's by "
        f"{float((deployed - before).abs().max()):.2e}"
    )
    assert torch.equal(_outputs(compressed, x), before), (
        f"{case.method}: baking a copy for deployment changed the compressed model"
    )


def check_onnx_export(case: ContractCase) -> None:
    """The deployed model exports to ONNX (``bench.deploy.onnx``: opset pinned, modules with a
    ``dense_equivalent()`` swapped in) and ONNX Runtime's outputs match PyTorch's to 1e-4."""
    from bench.deploy import deploy
    from bench.deploy import onnx as onnx_deploy

    _, _, compressed = case.compress()
    shape = tuple(case.probe().shape[1:])
    deployed = deploy(compressed, shape).model
    try:
        sess = onnx_deploy.session(onnx_deploy.export(deployed, shape), threads=1)
        onnx_deploy.check(deployed, sess, shape, batch_size=3)
    except Exception as err:  # the exporter and ONNX Runtime raise many types
        what = " ".join(str(err).split())[:300]
        raise AssertionError(f"{case.method}: ONNX export: {what}") from None


def _contains(dist: BaseDistribution, value) -> bool:
    """Whether ``value`` is one of the values ``dist`` can suggest (Optuna's public attributes)."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(dist, FloatDistribution | IntDistribution):
        if not isinstance(value, int | float):
            return False
        if not dist.low <= value <= dist.high:
            return False
        if dist.step is None:
            return True
        steps = (value - dist.low) / dist.step
        return math.isclose(steps, round(steps), abs_tol=1e-8)
    raise AssertionError(f"unsupported distribution {dist!r}")


def check_hyperparameters(case: ContractCase) -> None:
    cls = get_method_class(case.method)
    method = case.build()
    values = method.hyperparameters()
    again = create_method(case.method, **values).hyperparameters()
    assert again == values, f"{case.method}: hyperparameters do not round-trip: {values} -> {again}"
    defaults = cls.hyperparameter_defaults()
    for key, dist in cls.search_space.items():
        assert key in defaults, (
            f"{case.method}.search_space names {key!r}, not an __init__ argument"
        )
        assert _contains(dist, defaults[key]), (
            f"{case.method}: default {key}={defaults[key]!r} lies outside its search space {dist}"
        )


def check_survives_finetune(case: ContractCase) -> None:
    method, dense, compressed = case.compress()
    before_stored = stored_params(compressed)
    before_params = count_params(compressed)
    shapes = {k: tuple(v.shape) for k, v in compressed.state_dict().items()}
    data = case.data()
    SyntheticFinetune(data, lr=0.05)(compressed, 2.0, regularizer=method.regularize)
    assert stored_params(compressed) == before_stored, (
        f"{case.method}: stored params changed under fine-tuning "
        f"({before_stored} -> {stored_params(compressed)}): masks or patterns were lost"
    )
    assert count_params(compressed) == before_params
    after = {k: tuple(v.shape) for k, v in compressed.state_dict().items()}
    assert after == shapes, f"{case.method}: state dict shapes changed under fine-tuning"
    with torch.no_grad():
        assert torch.isfinite(compressed.eval()(case.probe())).all()
    # the state dict reloads into the compressed structure (what the harness saves as an artifact)
    clone = copy.deepcopy(compressed)
    clone.load_state_dict(compressed.state_dict())
    assert math.isclose(_achieved(dense, clone), _achieved(dense, compressed))


CONTRACT_CHECKS: dict[str, Callable[[ContractCase], None]] = {
    "ratio": check_ratio,
    "outputs": check_outputs,
    "determinism": check_determinism,
    "uses_dense_weights": check_uses_dense_weights,
    "layer_rates": check_layer_rates,
    "unreachable_ratio": check_unreachable_ratio,
    "deployed_outputs": check_deployed_outputs,
    "onnx_export": check_onnx_export,
    "hyperparameters": check_hyperparameters,
    "survives_finetune": check_survives_finetune,
}


def run_contract(
    method: str, model_factory: Callable[[], nn.Module] | None = None, **case_kwargs
) -> None:
    """Run every contract check on ``method`` (raises AssertionError at the first failure)."""
    factories = {"custom": model_factory} if model_factory else CONTRACT_MODELS
    for factory in factories.values():
        case = ContractCase(method, factory, **case_kwargs)
        for check in CONTRACT_CHECKS.values():
            check(case)
