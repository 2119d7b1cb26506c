"""The units, defined once: params, stored params, MACs and measured latency of a model.

- params: every parameter inference needs (``methods.base.count_params``); stored params count
  masked tensors by their nonzeros (``methods.base.stored_params``).
- MACs: multiply-accumulates of one forward pass of one image, from torch's own
  ``FlopCounterMode`` (it reports FLOPs = 2 x MACs). It counts what really executes, custom modules
  included: masked weights cost their dense MACs, a layer deployed sparse its nnz x output
  positions (``bench.deploy.sparse`` registers the FLOP formula of its op).
- MACs nz (``macs_nz``): the multiply-accumulates that touch a stored nonzero, the pruning papers'
  "FLOPs" for unstructured sparsity (ShrinkBench's ``flops_nz``): each conv / linear layer's MACs
  times the nonzero share of its (masked or baked) weight; every other op as it executes.
- model bytes: bytes really stored by the deployed model: dense tensors numel x element size
  (BatchNorm buffers included, ``num_batches_tracked`` not), a sparse layer its values + indices.
- latency: median wall time of a forward pass of a batch of the deployed model
  (``bench.deploy.deploy``), after warm-up, with a fixed thread count, per :class:`LatencyCase`
  (backend, device, batch): ``torch`` on CPU via ``torch.utils.benchmark.Timer`` (channels_last),
  on CUDA by CUDA events after synchronisation; ``onnxruntime`` by the same Timer around an ONNX
  Runtime CPU session (``bench.deploy.onnx``). speedup = dense / compressed, timed interleaved.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on CPU-only
# machines at import time; it is noise for a latency timer that never compiles anything.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.deploy import Deployment  # noqa: E402
from bench.deploy.sparse import describe  # noqa: E402
from methods.base import count_params, stored_params  # noqa: E402

__all__ = [
    "BACKENDS",
    "Footprint",
    "LatencyCase",
    "compare_latencies",
    "compare_latency",
    "count_macs",
    "count_macs_nz",
    "count_params",
    "deployable",
    "latency_cases",
    "latency_metrics",
    "layer_table",
    "measure",
    "measure_latency",
    "model_bytes",
    "stored_params",
    "timer_kind",
]


def _example(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.randn(batch_size, *input_shape, device=device)


@torch.no_grad()
def _flop_counts(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass of one image: the total and per module (``Root.name`` keys)."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(_example(model, input_shape, 1))
    finally:
        model.train(was_training)
    per_module = {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ONE image of ``input_shape`` (C, H, W)."""
    return _flop_counts(model, input_shape)[0] // 2


def _weight_layers(model: nn.Module):
    """(FlopCounterMode key, module) of every conv / linear layer of ``model``."""
    root = type(model).__name__
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            yield (f"{root}.{name}" if name else root), name, module


def count_macs_nz(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates that touch a stored nonzero, per image (ShrinkBench's ``flops_nz``).

    Each conv / linear layer counts its executed MACs times the nonzero share of its weight
    (masked weights through their mask, baked ones by their zeros); every other op, a sparse
    layer's (already nnz x positions) included, counts as it executes.
    """
    from bench.deploy.sparse import zero_fraction

    total, per_module = _flop_counts(model, input_shape)
    zeroed = sum(
        per_module.get(key, 0) * zero_fraction(module) for key, _, module in _weight_layers(model)
    )
    return round(total - zeroed) // 2


def model_bytes(model: nn.Module) -> int:
    """Bytes ``model`` stores: dense tensors numel x element size (buffers included, BatchNorm's
    ``num_batches_tracked`` not); a layer stored sparse (``stored_bytes()``) its values, indices
    and bias as stored. Measure the deployed model: a masked weight before baking also stores
    its mask."""
    from bench.deploy.sparse import is_sparse_module

    total, seen = 0, set()
    for module in model.modules():
        if id(module) in seen:
            continue
        if is_sparse_module(module):
            total += int(module.stored_bytes())
            seen |= {id(m) for m in module.modules()}
            continue
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor is None or id(tensor) in seen or name == "num_batches_tracked":
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def deployable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it would be deployed (``bench.deploy.deploy`` without measured
    choices): eval mode, every parametrisation baked in.

    A masked weight becomes a plain tensor with zeros (what a dense runtime executes); timing the
    parametrisation's ``weight * mask`` on every call would charge the method for bookkeeping.
    """
    from bench.deploy import deploy

    return deploy(model).model


BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyCase:
    """One latency measurement setting: a backend on a device at a batch size.

    ``onnxruntime`` runs ONNX Runtime's CPU session, so its device is always "cpu".
    """

    backend: str = "torch"
    device: str = "cpu"
    batch_size: int = 32

    @property
    def key(self) -> str:
        """``backend.device.bBATCH``, e.g. ``onnxruntime.cpu.b1`` (MLflow-safe: "cuda:1" is
        written "cuda1")."""
        return f"{self.backend}.{self.device.replace(':', '')}.b{self.batch_size}"


def latency_cases(
    device: str, batch_sizes: tuple[int, ...], backends: tuple[str, ...]
) -> list[LatencyCase]:
    """Every (backend, batch) on ``device``, the headline (first backend, first batch) first."""
    cases = []
    for backend in backends:
        on = "cpu" if backend == "onnxruntime" else device
        cases += [LatencyCase(backend, on, b) for b in batch_sizes]
    return list(dict.fromkeys(cases))


def latency_metrics(results: dict[LatencyCase, tuple[float, float]]) -> dict[str, float]:
    """Metrics of :func:`compare_latencies`' results: ``latency_ms``, ``dense_latency_ms`` and
    ``speedup`` of the headline (the first case) and the same three suffixed with each case's
    :attr:`LatencyCase.key` (``speedup.onnxruntime.cpu.b1``)."""
    out: dict[str, float] = {}
    for i, (case, (dense_ms, compressed_ms)) in enumerate(results.items()):
        values = {
            "latency_ms": compressed_ms,
            "dense_latency_ms": dense_ms,
            "speedup": dense_ms / compressed_ms,
        }
        if i == 0:
            out |= values
        out |= {f"{name}.{case.key}": v for name, v in values.items()}
    return out


def timer_kind(case: LatencyCase) -> str:
    """How ``case`` is timed: "cuda-events" (the torch backend on a CUDA device: kernels run
    asynchronously, so wall time around a call would measure the launch) or "benchmark-timer"
    (``torch.utils.benchmark.Timer``: CPU torch, and ONNX Runtime's CPU session)."""
    if case.backend == "torch" and torch.device(case.device).type == "cuda":
        return "cuda-events"
    return "benchmark-timer"


def _cuda_samples(fn, min_run_time: float, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` on ``device``, by CUDA events after synchronisation: at least
    10 calls, and until ``min_run_time`` seconds are measured."""
    times: list[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < 10 or sum(times) < min_run_time:
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
    return times


def _deploy_for(model, input_shape, case: LatencyCase, threads: int) -> nn.Module:
    """``model`` deployed for ``case``'s device and batch (per-layer forms timed there)."""
    from bench.deploy import Timing, deploy

    model = copy.deepcopy(model).to(torch.device(case.device)).eval()
    return deploy(model, input_shape, Timing(case.device, case.batch_size, threads)).model


class _Runner:
    """One deployed model ready to time on one case; :meth:`samples` returns seconds per call."""

    def __init__(
        self,
        model,
        input_shape,
        case: LatencyCase,
        threads: int,
        channels_last: bool,
        deployed: nn.Module | None = None,
    ):
        from bench.deploy import onnx as onnx_deploy

        self.case, self.threads = case, threads
        device = torch.device(case.device)
        model = copy.deepcopy(deployed or _deploy_for(model, input_shape, case, threads))
        model = model.to(device).eval()
        x = torch.randn(case.batch_size, *input_shape, device=device)
        if case.backend == "onnxruntime":
            sess = onnx_deploy.session(onnx_deploy.export(model, input_shape), threads)
            onnx_deploy.check(model, sess, input_shape)
            feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
            self.fn = lambda: sess.run(None, feed)
        else:
            if channels_last and x.dim() == 4:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            self.fn = lambda: model(x)
        for _ in range(3):  # warm-up: allocator, oneDNN primitive caches, ORT arenas
            self.fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def samples(self, min_run_time: float) -> list[float]:
        if timer_kind(self.case) == "cuda-events":
            return _cuda_samples(self.fn, min_run_time, torch.device(self.case.device))
        # torch.utils.benchmark: warm-up, blocks sized to the timer resolution; num_threads sets
        # torch's threads (ONNX Runtime has its own, set on the session)
        timer = Timer(stmt="fn()", globals={"fn": self.fn}, num_threads=self.threads)
        return timer.blocked_autorange(min_run_time=min_run_time).times


@torch.no_grad()
def compare_latencies(
    dense: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, ...],
    cases: list[LatencyCase],
    *,
    threads: int | None = None,
    min_run_time: float = 0.5,
    rounds: int = 3,
    channels_last: bool = True,
    deployed: dict[tuple[int, str, int], nn.Module] | None = None,
) -> dict[LatencyCase, tuple[float, float]]:
    """(dense ms, compressed ms) per case: medians over ``rounds`` interleaved measurements.

    ``deployed`` holds deployments already made, keyed ``(0 dense | 1 compressed, device,
    batch)``; each model is deployed once per (device, batch) (the backends share it).

    Both models go through ``bench.deploy.deploy`` for the case's device and batch (the
    ``onnxruntime`` backend then exports the deployed model to ONNX, checks its outputs
    against PyTorch to 1e-4, ``bench.deploy.onnx``, and times an ONNX Runtime CPU session with
    ``threads`` intra-op threads). On CUDA the torch backend times with CUDA events after
    synchronisation. Interleaving puts both models under the same machine state (frequency,
    other load), so a speedup is not an artefact of when each was timed.
    """
    threads = threads or torch.get_num_threads()
    known = dict(deployed or {})
    results = {}
    for case in cases:
        runners = []
        for i, m in enumerate((dense, compressed)):
            key = (i, case.device, case.batch_size)
            if key not in known:
                known[key] = _deploy_for(m, input_shape, case, threads)
            runners.append(_Runner(m, input_shape, case, threads, channels_last, known[key]))
        samples: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, runner in enumerate(runners):
                samples[i] += runner.samples(min_run_time / rounds)
        results[case] = tuple(float(torch.tensor(s).median()) * 1e3 for s in samples)
    return results


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 32,
    threads: int | None = None,
    min_run_time: float = 0.5,
    channels_last: bool = True,
    device: str = "cpu",
    backend: str = "torch",
) -> float:
    """Median forward latency in milliseconds of one batch of the deployed model, after warm-up.

    ``threads`` defaults to torch's current setting; dense and compressed models must be measured
    with the same value (:func:`compare_latency` does both, interleaved). ``channels_last`` (NHWC)
    is used for 4-D inputs: what a CPU deployment of a conv net runs (15-60 % faster here).
    """
    threads = threads or torch.get_num_threads()
    case = LatencyCase(backend, device, batch_size)
    runner = _Runner(model, input_shape, case, threads, channels_last)
    return float(torch.tensor(runner.samples(min_run_time)).median()) * 1e3


def compare_latency(
    dense: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 32,
    threads: int | None = None,
    min_run_time: float = 0.5,
    rounds: int = 3,
    channels_last: bool = True,
    device: str = "cpu",
    backend: str = "torch",
) -> tuple[float, float]:
    """(dense ms, compressed ms) of one case (:func:`compare_latencies`)."""
    case = LatencyCase(backend, device, batch_size)
    return compare_latencies(
        dense,
        compressed,
        input_shape,
        [case],
        threads=threads,
        min_run_time=min_run_time,
        rounds=rounds,
        channels_last=channels_last,
    )[case]


@dataclass(frozen=True)
class Footprint:
    """Size and cost of one model at one input shape.

    Attributes:
        params: parameters of the deployed model (a layer deployed sparse by its stored values).
        stored_params: values stored (masked tensors by nnz).
        macs: multiply-accumulates per image the deployed model executes.
        macs_nz: multiply-accumulates per image that touch a stored nonzero.
        model_bytes: bytes the deployed model stores (values + indices of sparse layers).
        latency_ms: median batch latency, or None when not measured.
        deployed: what was deployed (``bench.deploy.sparse.describe``): "structured" or e.g.
            "masked dense: 13 layers; sparse: 2 layers".
    """

    params: int
    stored_params: int
    macs: int
    macs_nz: int
    model_bytes: int
    latency_ms: float | None = None
    deployed: str = "structured"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    stored: int | None = None,
    latency: bool = True,
    batch_size: int = 32,
    threads: int | None = None,
    min_run_time: float = 0.5,
    device: str = "cpu",
    backend: str = "torch",
    deployment: Deployment | None = None,
) -> Footprint:
    """Params, stored params, MACs, MACs nz, model bytes and (optionally) latency of ``model``.

    Counts are taken on the deployed model: ``deployment`` when given (``bench.deploy.deploy``
    of ``model``, e.g. with measured per-layer choices), else ``deploy(model)``.

    Args:
        stored: a stored-parameter count already taken (e.g. before ``model`` was copied);
            defaults to ``stored_params(model)``.
    """
    from bench.deploy import deploy

    deployed = (deployment or deploy(model, input_shape)).model
    return Footprint(
        params=count_params(deployed),
        stored_params=stored if stored is not None else stored_params(model),
        macs=count_macs(deployed, input_shape),
        # of the model as compressed: a deployment choice (a pair recomposed dense for speed)
        # changes what executes, not which stored values are touched
        macs_nz=count_macs_nz(model, input_shape),
        model_bytes=model_bytes(deployed),
        latency_ms=(
            measure_latency(
                deployed,
                input_shape,
                batch_size=batch_size,
                threads=threads,
                min_run_time=min_run_time,
                device=device,
                backend=backend,
            )
            if latency
            else None
        ),
        deployed=describe(deployed),
    )


def _note_of(layer: str, notes: dict[str, str]) -> str | None:
    """The note of ``layer`` or of the nearest module above it (a factorised pair's note covers
    both of its convs)."""
    name = layer
    while True:
        if name in notes:
            return notes[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def layer_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    method: Any = None,
    notes: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per conv / linear leaf: name, kind, shape, params, stored params, MACs and MACs nz
    per image.

    MACs per layer come from ``FlopCounterMode``'s per-module breakdown, so the rows add up to
    :func:`count_macs` for conv nets (elementwise ops are not counted by torch either). With a
    ``method``, the facts of its ``layer_table`` hook (rank, kept filters) join the matching rows;
    ``notes`` (``Deployment.notes``, by layer name) join as a ``deployed`` column.
    """
    from bench.deploy.sparse import zero_fraction

    _, per_module = _flop_counts(model, input_shape)
    rows = []
    for key, name, module in _weight_layers(model):
        macs = per_module.get(key, 0) // 2
        rows.append(
            {
                "layer": name,
                "kind": type(module).__name__,
                "shape": "x".join(str(s) for s in module.weight.shape),
                "params": count_params(module),
                "stored_params": stored_params(module),
                "macs": macs,
                "macs_nz": round(macs * (1.0 - zero_fraction(module))),
            }
        )
    if method is not None:
        extra = {row.get("layer"): row for row in method.layer_table(model)}
        rows = [
            {**row, **{k: v for k, v in extra.get(row["layer"], {}).items() if k != "layer"}}
            for row in rows
        ]
    if notes:
        rows = [
            {**row, "deployed": note} if (note := _note_of(row["layer"], notes)) else row
            for row in rows
        ]
    return rows
