"""Timing small alternatives against each other: the per-layer choices of ``bench.deploy``.

``torch.utils.benchmark.Timer`` (it synchronises CUDA and fixes the thread count), interleaved
rounds so that every form is timed under the same machine state; medians in milliseconds.
"""

from __future__ import annotations

import copy
import logging
import statistics

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on CPU-only
# machines at import time; noise for a timer that never compiles anything.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

__all__ = ["layer_inputs", "time_interleaved"]

_ROUNDS = 3


@torch.no_grad()
def time_interleaved(forms: dict[str, nn.Module], x: torch.Tensor, timing) -> dict[str, float]:
    """Median milliseconds of ``form(x)`` for every form, measured in interleaved rounds with
    ``timing.threads`` threads, ``timing.min_run_time`` seconds per form; 4-D inputs run
    channels-last on CPU (what the deployed model runs)."""
    device = torch.device(timing.device)
    x = x.to(device)
    cpu_nhwc = device.type == "cpu" and x.dim() == 4
    if cpu_nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    threads = timing.threads or torch.get_num_threads()
    timers = {}
    for label, form in forms.items():
        form = copy.deepcopy(form).to(device).eval()
        if cpu_nhwc:
            form = form.to(memory_format=torch.channels_last)
        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            form(x)
        timers[label] = Timer("f(x)", globals={"f": form, "x": x}, num_threads=threads)
    samples: dict[str, list[float]] = {label: [] for label in forms}
    for _ in range(_ROUNDS):
        for label, timer in timers.items():
            run = timer.blocked_autorange(min_run_time=timing.min_run_time / _ROUNDS)
            samples[label] += run.times
    return {label: statistics.median(times) * 1e3 for label, times in samples.items()}


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of each named layer when ``model`` runs ``x`` (forward pre-hooks): where the
    per-layer choices time their candidate forms."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach())
        )
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen
