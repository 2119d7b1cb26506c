"""The contract suite every registered compression method must pass (like ``optuna.testing``).

Each check is a plain function ``check_*(case)`` that raises ``AssertionError`` with a message
naming the method; ``tests/test_contract.py`` parametrises them over ``list_methods()`` x
``CONTRACT_MODELS``, so a new method is tested without anyone writing a new test. Plugin authors
can call :func:`run_contract` on their own method, and register toy methods for their own tests
inside :func:`temporary_registry`.

What the contract asks of a method (DESIGN.md, "Methods"):

- the achieved params ratio meets the target within its tolerance (stored params for unstructured);
- outputs are finite and keep their shape;
- the same seed gives the same compressed model;
- hyperparameters round-trip through ``create_method``, and ``search_space`` names ``__init__``
  arguments whose defaults lie inside their distributions;
- the compressed state (masks, fixed patterns, shapes) survives fine-tuning.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from methods import base
from methods.base import (
    CalibData,
    CompressionMethod,
    Target,
    count_params,
    create_method,
    get_method_class,
)

__all__ = [
    "CONTRACT_CHECKS",
    "CONTRACT_MODELS",
    "ContractCase",
    "SyntheticFinetune",
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


class SyntheticFinetune:
    """A real ``Finetune`` on synthetic batches: a few SGD steps per "epoch", for tests only.

    It trains (so masks and fixed patterns are exercised by real optimizer steps) but stays fast:
    one epoch = the calibration batches once.
    """

    def __init__(self, data: CalibData, lr: float = 0.01) -> None:
        self.data = data
        self.lr = lr
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.epochs_trained = 0.0

    def __call__(self, model: nn.Module, epochs: float, *, regularizer=None) -> float:
        batches = self.data.take(10**6)
        steps = max(1, round(epochs * len(batches))) if epochs > 0 else 0
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        model.train()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss = nn.functional.cross_entropy(model(x), y)
            extra = regularizer(model) if regularizer is not None else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.epochs_trained += epochs
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return 100.0 * correct / sum(len(y) for _, y in batches)

    def log(self, metrics, step: int) -> None:
        self.logged.append((step, dict(metrics)))


def _tiny_vgg() -> nn.Module:
    import bench.models

    return bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=0.125)


def _tiny_resnet() -> nn.Module:
    import bench.models

    return bench.models.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.5)


# Small models the contract runs on: a plain conv chain and a residual net (input 3 x 16 x 16).
CONTRACT_MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": _tiny_vgg,
    "resnet": _tiny_resnet,
}


@dataclass
class ContractCase:
    """One method on one model: builds fresh dense models and data on demand."""

    method: str
    model_factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int] = (3, 16, 16)
    num_classes: int = 10
    ratio: float = 2.0
    hyperparameters: dict = field(default_factory=dict)

    def dense(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.model_factory().eval()

    def data(self) -> CalibData:
        return CalibData.synthetic(self.input_shape, self.num_classes, n_batches=3, batch_size=16)

    def build(self) -> CompressionMethod:
        return create_method(self.method, **self.hyperparameters)

    def compress(self, seed: int = 0) -> tuple[CompressionMethod, nn.Module, nn.Module]:
        """(method, dense, compressed) with every RNG seeded by ``seed``."""
        dense = self.dense(seed)
        method = self.build()
        torch.manual_seed(seed)
        data = self.data()
        compressed = method.compress(
            copy.deepcopy(dense), Target(ratio=self.ratio), data, SyntheticFinetune(data)
        )
        return method, dense, compressed

    def probe(self) -> torch.Tensor:
        return torch.randn(4, *self.input_shape, generator=torch.Generator().manual_seed(123))


def _achieved(method: CompressionMethod, dense: nn.Module, compressed: nn.Module) -> float:
    return count_params(dense) / method.stored_params(compressed)


def check_ratio(case: ContractCase) -> None:
    method, dense, compressed = case.compress()
    achieved = _achieved(method, dense, compressed)
    assert abs(achieved / case.ratio - 1) <= Target(ratio=case.ratio).tolerance + 1e-9, (
        f"{case.method}: achieved params ratio {achieved:.3f}, target {case.ratio}"
    )
    if method.structured:
        dense_ratio = count_params(dense) / count_params(compressed)
        assert dense_ratio > 1.0, (
            f"{case.method} is structured but its dense param count did not drop"
        )


def check_outputs(case: ContractCase) -> None:
    _, dense, compressed = case.compress()
    x = case.probe()
    with torch.no_grad():
        y_dense, y = dense.eval()(x), compressed.eval()(x)
    assert y.shape == y_dense.shape, f"{case.method}: output shape {y.shape} != {y_dense.shape}"
    assert torch.isfinite(y).all(), f"{case.method}: non-finite outputs"


def check_determinism(case: ContractCase) -> None:
    x = case.probe()
    outs = []
    for _ in range(2):
        _, _, compressed = case.compress(seed=7)
        with torch.no_grad():
            outs.append(compressed.eval()(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (
        f"{case.method}: two compressions under the same seed differ"
    )


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
        internal = dist.to_internal_repr(defaults[key])
        assert dist._contains(internal), (
            f"{case.method}: default {key}={defaults[key]!r} lies outside its search space {dist}"
        )


def check_survives_finetune(case: ContractCase) -> None:
    method, dense, compressed = case.compress()
    before_stored = method.stored_params(compressed)
    before_params = count_params(compressed)
    shapes = {k: tuple(v.shape) for k, v in compressed.state_dict().items()}
    data = case.data()
    SyntheticFinetune(data, lr=0.05)(compressed, 2.0, regularizer=method.regularize)
    assert method.stored_params(compressed) == before_stored, (
        f"{case.method}: stored params changed under fine-tuning "
        f"({before_stored} -> {method.stored_params(compressed)}): masks or patterns were lost"
    )
    assert count_params(compressed) == before_params
    after = {k: tuple(v.shape) for k, v in compressed.state_dict().items()}
    assert after == shapes, f"{case.method}: state dict shapes changed under fine-tuning"
    with torch.no_grad():
        assert torch.isfinite(compressed.eval()(case.probe())).all()
    # the state dict reloads into the compressed structure (what the harness saves as an artifact)
    clone = copy.deepcopy(compressed)
    clone.load_state_dict(compressed.state_dict())
    assert math.isclose(_achieved(method, dense, clone), _achieved(method, dense, compressed))


CONTRACT_CHECKS: dict[str, Callable[[ContractCase], None]] = {
    "ratio": check_ratio,
    "outputs": check_outputs,
    "determinism": check_determinism,
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
