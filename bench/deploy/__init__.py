"""The deployed model: what a user would ship, and what the harness times, exports and counts.

:func:`deploy` turns a compressed model (as a method returns it, masks and BatchNorms included)
into its deployed form, on a copy, pass by pass. Every pass keeps the outputs (to 1e-4) and may
leave a one-line note per layer (``Deployment.notes``, joined to ``layers.csv``):

1. bake: every parametrisation (a mask) becomes a plain tensor (``methods._masks``);
2. fold: BatchNorm folded into the conv before it (``bench.deploy.fused``);
3. choose: each layer runs in the fastest of its equivalent forms, measured at its own input on
   the target device (``Timing``): a factorised pair or its recomposed dense conv
   (``bench.deploy.fused``); a sparse weight as a masked dense layer or a sparse kernel
   (``bench.deploy.sparse``). Without a ``Timing`` nothing is chosen by measurement.

The dense baseline goes through the same passes, so a speedup compares like with like.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Deployment", "Timing", "deploy"]


@dataclass(frozen=True)
class Timing:
    """Where and how per-layer choices are timed: the deployment target's device, batch, threads.

    ``min_run_time`` is seconds per candidate form per layer (kept short: choices are relative).
    """

    device: str = "cpu"
    batch_size: int = 32
    threads: int | None = None
    min_run_time: float = 0.05


@dataclass
class Deployment:
    """The deployed model (eval mode) and a note per layer whose form a pass chose or changed."""

    model: nn.Module
    notes: dict[str, str] = field(default_factory=dict)


def deploy(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    timing: Timing | None = None,
) -> Deployment:
    """The deployed form of ``model`` (left unchanged) for inputs of ``input_shape`` (C, H, W);
    choices by measurement need both ``input_shape`` and ``timing``."""
    from bench.deploy.fused import choose_factorised, fold_batchnorm
    from bench.deploy.sparse import sparsify
    from methods._masks import bake_parametrizations

    deployed = bake_parametrizations(copy.deepcopy(model)).eval()
    notes: dict[str, str] = {}
    passes = []
    if input_shape is not None:
        passes.append(fold_batchnorm(deployed, input_shape))
        if timing is not None:
            passes.append(choose_factorised(deployed, input_shape, timing))
    passes.append(sparsify(deployed, input_shape, timing))
    for found in passes:  # a layer two passes looked at keeps both notes, in pass order
        for name, note in found.items():
            notes[name] = f"{notes[name]}; {note}" if name in notes else note
    return Deployment(deployed, notes)
