"""The contract every compression method keeps, and the registry that finds them.

A method is a class with a unique ``name``, a ``family`` ("frequency" or "spatial"), explicit
keyword hyperparameters in ``__init__`` (each with a default), a ``search_space`` over a subset
of those arguments, and one required method, :meth:`CompressionMethod.compress`.

Lifecycle (what the harness does with a method):

1. ``method = create_method(name, **hyperparameters)``; bad values raise :class:`MethodConfigError`
   from ``__init__`` (the CLI turns it into one line and exit code 2).
2. ``compressed = method.compress(model, target, data, finetune)``. ``model`` is a trained dense
   model in eval mode that the method may modify in place or copy; ``target`` says how much to
   compress; ``data`` gives training-split batches only (never validation or test); ``finetune``
   trains a model under the study's recipe and returns its validation accuracy. The returned model
   is the deployable one: pruned filters are really gone, factorised layers really are two convs.
3. The harness fine-tunes the returned model for the study's epochs, adding
   ``method.regularize(model)`` to the loss; masks and fixed sparsity patterns must survive that
   (use parametrisations or buffers).
4. The harness measures the returned model itself: ``count_params``, :func:`stored_params` (the same
   count for every method: masked tensors by their nonzeros; a method cannot report its own size)
   and MACs; ``method.layer_table(model)`` adds per-layer facts, read from the model it is given.

Invariants an implementation keeps:

- It never uses MLflow, Optuna trials, YAML or the CLI (``optuna.distributions`` for the search
  space is data); it reports progress only through ``finetune.log``.
- It meets a ratio target within 2 % of params (``stored_params``): solve for it (bisection), do not
  assume a nominal rate hits it.
- Under a fixed ``torch.manual_seed`` it is deterministic.
- ``compress`` leaves no state on the method: the hooks (``regularize``, ``layer_table``) read what
  they need from the model they are given.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from methods._targets import LayerCountError, MethodConfigError, Target, parse_layer_rates

__all__ = [
    "CalibData",
    "CompressionMethod",
    "CompressionWarning",
    "Finetune",
    "LayerCountError",
    "MethodConfigError",
    "Target",
    "count_params",
    "create_method",
    "get_method_class",
    "list_methods",
    "no_finetune",
    "parse_layer_rates",
    "register_method",
    "stored_params",
]


class CompressionWarning(UserWarning):
    """Something a method adjusted rather than failed on (a rank clamped to [1, min(m, d)], a layer
    left dense). The harness records every one raised during ``compress`` in the run's tags."""


# ----------------------------------------------------------------------------------------- units
def _sparse_modules(model: nn.Module) -> tuple[int, set[int]]:
    """Values stored by the layers that store only some of their weight (a ``stored_values()``
    method, e.g. ``bench.deploy.sparse``), and the ids of those layers' own parameters."""
    sparse = [m for m in model.modules() if callable(getattr(m, "stored_values", None))]
    return sum(int(m.stored_values()) for m in sparse), {
        id(p) for m in sparse for p in m.parameters()
    }


def count_params(model: nn.Module) -> int:
    """All parameters inference needs (classifier included), as dense values.

    Parametrised tensors (``torch.nn.utils.parametrize``) count their original tensor once; a
    layer stored sparse (it offers ``stored_values()``) counts the values it stores.
    """
    total, skip = _sparse_modules(model)
    return total + sum(p.numel() for p in model.parameters() if id(p) not in skip)


def stored_params(model: nn.Module) -> int:
    """Values that must be stored to run ``model``: dense tensors count whole, masked ones by nnz.

    A tensor is masked when a parametrisation on it has a ``mask`` buffer (see ``methods._masks``)
    or when its module exposes ``weight_mask`` (``torch.nn.utils.prune``). Indices of the kept
    values are not counted (the papers do not count them either); dense values of a masked tensor
    that the mask zeroes are not counted. A layer stored sparse (``stored_values()``) counts the
    values it stores.
    """
    total, seen = _sparse_modules(model)
    for module in model.modules():
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is not None:
            for plist in parametrizations.values():
                original = plist.original
                seen.add(id(original))
                masks = [getattr(p, "mask", None) for p in plist]
                masks = [m for m in masks if isinstance(m, torch.Tensor)]
                if masks:
                    keep = masks[0].bool()
                    for m in masks[1:]:
                        keep = keep & m.bool()
                    total += int(keep.expand_as(original).sum())
                else:
                    total += original.numel()
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            mask = getattr(module, pname.removesuffix("_orig") + "_mask", None)
            if pname.endswith("_orig") and isinstance(mask, torch.Tensor):
                total += int(mask.bool().sum())
            else:
                total += p.numel()
    return total


# ------------------------------------------------------------------------------ data and training
@dataclass(frozen=True)
class CalibData:
    """Training-split batches a method may look at; never validation or test data.

    Attributes:
        batches: returns a fresh iterator of ``(images, labels)``: normalised float images
            N x C x H x W on ``device``, with the training augmentation.
        input_shape: C, H, W of one image.
        num_classes: number of classes.
        device: where the batches live.
    """

    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    input_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def take(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` batches (fewer if the split is shorter)."""
        out = []
        for i, batch in enumerate(self.batches()):
            if i >= n:
                break
            out.append(batch)
        return out

    @classmethod
    def synthetic(
        cls,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        n_batches: int = 4,
        batch_size: int = 32,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> CalibData:
        """Random normal images and labels: for footprint checks and tests, not for accuracy."""
        device = torch.device(device)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(n_batches):
                x = torch.randn(batch_size, *input_shape, generator=gen)
                y = torch.randint(0, num_classes, (batch_size,), generator=gen)
                yield x.to(device), y.to(device)

        return cls(batches, tuple(input_shape), num_classes, device)


class Finetune(Protocol):
    """What the harness passes to ``compress``: train under the study's recipe.

    ``finetune(model, epochs)`` trains ``model`` in place for ``epochs`` epochs (fractions allowed)
    with the study's fine-tuning recipe, adding ``regularizer(model)`` to the loss when given, and
    returns the validation top-1 accuracy in percent. ``finetune.log(metrics, step)`` records step
    metrics of the run (for example each round's rank and achieved ratio).
    """

    def __call__(
        self,
        model: nn.Module,
        epochs: float,
        *,
        regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None,
    ) -> float: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...


class _NoFinetune:
    """A ``Finetune`` that trains nothing: for footprint checks (``bench.profile``) and tests."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.calls: list[float] = []

    def __call__(self, model, epochs, *, regularizer=None) -> float:
        self.calls.append(float(epochs))
        return float("nan")

    def log(self, metrics, step) -> None:
        self.logged.append((step, dict(metrics)))


def no_finetune() -> _NoFinetune:
    """A fresh finetune stand-in that records calls and logs but does not train."""
    return _NoFinetune()


# ---------------------------------------------------------------------------------------- method
class CompressionMethod:
    """Base class of every compression method. Subclass, set the class attributes, implement
    :meth:`compress`, and decorate with :func:`register_method`.

    Class attributes:
        name: registry key == file name == YAML entry == MLflow tag.
        family: "frequency" or "spatial".
        search_space: Optuna distributions over a subset of ``__init__``'s keyword arguments.
        structured: True when the deployed model is smaller in dense params and MACs; False for
            unstructured sparsity (dense MACs unchanged, reported as such).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    search_space: ClassVar[Mapping[str, Any]] = {}
    structured: ClassVar[bool] = True

    def compress(
        self, model: nn.Module, target: Target, data: CalibData, finetune: Finetune
    ) -> nn.Module:
        """Return the deployable compressed model (see the module docstring for the contract)."""
        raise NotImplementedError

    # -- optional hooks, no-ops by default
    def regularize(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added during fine-tuning (e.g. L1 in the DCT domain); None = none."""
        return None

    def layer_table(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optional per-layer facts (rank, kept filters, sparsity) for the run's layer CSV.

        Read from ``model`` alone (its modules, shapes, masks, or facts the method noted on the
        modules while compressing), so a fresh instance gives the same table for the same model.
        """
        return []

    # -- hyperparameters
    @classmethod
    def hyperparameter_defaults(cls) -> dict[str, Any]:
        """``__init__``'s keyword arguments and their defaults."""
        sig = inspect.signature(cls.__init__)
        out = {}
        for pname, p in sig.parameters.items():
            if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{cls.__name__}.__init__ argument {pname!r} needs a default")
            out[pname] = p.default
        return out

    def hyperparameters(self) -> dict[str, Any]:
        """The values this instance was built with (round-trips through ``create_method``)."""
        return {k: getattr(self, k) for k in self.hyperparameter_defaults()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


# -------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[CompressionMethod]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_package_imported = False


def _import_package_methods() -> None:
    """Import every public module of ``methods`` once (each registers its method), on the
    registry's first use: ``methods/__init__.py`` imports nothing, so ``methods._targets`` loads
    without torch."""
    global _package_imported
    if _package_imported:
        return
    _package_imported = True  # first: a method file registering itself does not come back here
    import methods

    try:
        for info in pkgutil.iter_modules(methods.__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"methods.{info.name}")
    except BaseException:
        _package_imported = False
        raise


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: add a method to the registry. A duplicate or malformed name raises."""
    if not (isinstance(cls, type) and issubclass(cls, CompressionMethod)):
        raise TypeError(f"{cls!r} is not a CompressionMethod subclass")
    if not cls.__module__.startswith("methods."):
        _import_package_methods()  # the package's own names first: a plugin cannot take one
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"{cls.__name__}.name {cls.name!r} must be snake_case, e.g. 'my_method'")
    if cls.family not in ("frequency", "spatial"):
        raise ValueError(
            f"{cls.__name__}.family must be 'frequency' or 'spatial', not {cls.family!r}"
        )
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}"
        )
    defaults = cls.hyperparameter_defaults()
    unknown = set(cls.search_space) - set(defaults)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.search_space names {sorted(unknown)} which are not __init__ arguments"
        )
    _REGISTRY[cls.name] = cls
    return cls


def list_methods(family: str | None = None) -> list[str]:
    """Registered method names, sorted; optionally only one family."""
    _import_package_methods()
    return sorted(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def get_method_class(name: str) -> type[CompressionMethod]:
    """The class registered under ``name``; unknown names raise with a did-you-mean."""
    _import_package_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodConfigError(
            f"unknown method {name!r}{hint}; registered: {', '.join(list_methods())}"
        ) from None


def create_method(name: str, **hyperparameters: Any) -> CompressionMethod:
    """Build a registered method; unknown hyperparameter names raise ``MethodConfigError``."""
    cls = get_method_class(name)
    allowed = cls.hyperparameter_defaults()
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise MethodConfigError(
            f"method {name!r} has no hyperparameter {unknown[0]!r}; it takes: {', '.join(allowed)}"
        )
    return cls(**hyperparameters)
