"""Small facts about a module tree that methods of every family need.

- :func:`example_input`: an all-zeros batch to trace a model with.
- :func:`modules_in_run_order`: the modules of some types in the order a forward pass first calls
  them (which is not the order they are registered in).
- :func:`note_layers` / :func:`noted_layers`: facts a method records on the layers it compressed,
  as plain attributes of those modules, so that its ``layer_table`` reads them from the model it is
  given (a deep copy, a pickled model, a fresh method instance) rather than from the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["example_input", "modules_in_run_order", "note_layers", "noted_layers"]


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """One all-zeros image batch (1 x C x H x W) on the model's device, for tracing."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(1, *input_shape, device=device)


def modules_in_run_order(
    model: nn.Module, example: torch.Tensor, types: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``types``, in the order ``model(example)`` first calls
    them; modules the pass never calls are left out.

    Runs one forward pass in eval mode without autograd; the training mode is restored.
    """
    names = {module: name for name, module in model.named_modules()}
    order: list[nn.Module] = []

    def record(module: nn.Module, *_: object) -> None:
        if module not in order:
            order.append(module)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [(names[m], m) for m in order]


def note_layers(
    layers: Sequence[tuple[str, nn.Module]],
    key: str,
    facts: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Record on each module of ``layers`` its position in that list and its ``facts``.

    The record is a plain attribute ``key`` of the module: it survives ``copy.deepcopy``, pickling
    and fine-tuning, and stays out of the state dict (no checkpoint changes shape).
    """
    for position, (_, module) in enumerate(layers):
        extra = facts[position] if facts is not None else {}
        setattr(module, key, {"position": position, **extra})


def noted_layers(model: nn.Module, key: str) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """``(name, module, facts)`` of every module of ``model`` noted under ``key``, in the order
    they were noted (see :func:`note_layers`)."""
    noted = [
        (name, module, dict(getattr(module, key)))
        for name, module in model.named_modules()
        if isinstance(getattr(module, key, None), dict)
    ]
    return sorted(noted, key=lambda item: item[2]["position"])
