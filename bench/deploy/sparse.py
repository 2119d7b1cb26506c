"""Sparse weights deployed sparse where that is faster: the ``sparsify`` pass of ``bench.deploy``.

Method-agnostic: any ``nn.Conv2d`` (ungrouped) or ``nn.Linear`` whose weight is at least
:data:`MIN_ZEROS` zeros is a candidate (``magnitude``'s masked layers, ``lrsd``'s sparse branch
``LowRankSparse.sparse``, whatever a plugin leaves with zeros). Each candidate is timed at its real
input (a forward pre-hook on one batch of ``timing.batch_size``, channels-last as the latency
timer runs it) in its equivalent forms, interleaved:

- masked dense: the layer as it is (zeros stored and multiplied);
- sparse CSR: only the nonzeros stored (``torch.sparse_csr_tensor``, int32 indices), executed as
  a CSR matrix times the im2col patches (``F.unfold``) on CPU; two layouts for convs (all images
  in one product, or one product per image: which wins depends on the spatial size);
- 2:4 semi-structured (``torch.sparse.to_sparse_semi_structured``), only for a linear layer on
  CUDA whose pattern already is 2:4 (unstructured masks rarely are): guarded, untested here.

The fastest form is kept; every candidate gets a note ("sparse CSR (nnz 12%): 0.41 ms vs dense
0.52 ms" or "dense: faster than sparse CSR (0.9 vs 0.5 ms)"). A sparse form is kept only if it
reproduces the dense layer's output to 1e-4 at that input. Without a ``Timing`` nothing changes.

A sparse module computes through the custom op ``freqbench::csr_matmul``, whose FLOP formula
(``torch.utils.flop_counter.register_flop_formula``) counts nnz x output positions: what really
executes, so ``FlopCounterMode`` counts a sparse layer at its nonzeros. It offers
``dense_equivalent()`` (a plain layer with the same outputs, for ONNX export), ``stored_values()``
and ``stored_bytes()`` (values + indices + bias, as stored).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from bench.deploy.timing import layer_inputs
from methods._lowrank import set_module

__all__ = [
    "MIN_ZEROS",
    "SparseConv2d",
    "SparseLinear",
    "describe",
    "is_sparse_module",
    "sparsify",
    "zero_fraction",
]

# A layer is tried in a sparse form only when at least this share of its weight is zeros: below it
# CSR is many times slower than a dense conv here (5-10x at 60-80 % zeros,
# benchmarks/sparse_layers.py), and timing it would cost seconds per layer.
MIN_ZEROS = 0.9
# The attribute a layer kept dense by a measured choice carries, so a second deploy skips it.
_CHOICE = "_sparse_choice"


# ------------------------------------------------------------------------------ the custom op
@torch.library.custom_op("freqbench::csr_matmul", mutates_args=())
def csr_matmul(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """CSR (rows x K, given by its parts) @ ``dense`` (K x n, or B x K x n: one product each)."""
    k = dense.shape[-2]
    matrix = torch.sparse_csr_tensor(
        crow, col, values, (crow.numel() - 1, k), check_invariants=False
    )
    if dense.dim() == 2:
        return torch.sparse.mm(matrix, dense)
    return torch.stack([torch.sparse.mm(matrix, d) for d in dense.unbind(0)])


@csr_matmul.register_fake
def _(crow, col, values, dense):
    return dense.new_empty((*dense.shape[:-2], crow.numel() - 1, dense.shape[-1]))


@register_flop_formula(torch.ops.freqbench.csr_matmul)
def _csr_flops(crow, col, values, dense, out_shape=None, **kwargs) -> int:
    """2 x nnz x columns (x batch): a multiply and an add per stored value per output position."""
    batch = 1
    for size in dense[:-2]:
        batch *= size
    return 2 * values[0] * dense[-1] * batch


# ---------------------------------------------------------------------------- sparse modules
class _CSRWeight(nn.Module):
    """A weight matrix (rows x K) stored as CSR parts (int32 indices), plus an optional bias."""

    def _store(self, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta", on every call
            warnings.simplefilter("ignore", UserWarning)
            csr = matrix.detach().to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices().to(torch.int32))
        self.register_buffer("col", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.k = matrix.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def _matrix(self) -> torch.Tensor:
        rows = self.crow.numel() - 1
        csr = torch.sparse_csr_tensor(
            self.crow, self.col, self.values, (rows, self.k), check_invariants=False
        )
        return csr.to_dense()

    def stored_values(self) -> int:
        """Values kept: the nonzeros and the bias (indices are not values)."""
        return self.nnz + (0 if self.bias is None else self.bias.numel())

    def stored_bytes(self) -> int:
        """Bytes as stored: values, row pointers and column indices (int32), bias."""
        tensors = [self.values, self.crow, self.col] + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _dense_layer(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.to(self.values.device).eval()


class SparseLinear(_CSRWeight):
    """A linear layer whose weight is stored as CSR: ``y = W_csr x + b``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = csr_matmul(self.crow, self.col, self.values, flat.T.contiguous()).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense_equivalent(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same outputs."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return self._dense_layer(layer, self._matrix())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nnz={self.nnz}"


class SparseConv2d(_CSRWeight):
    """An ungrouped conv whose weight (N x C k k) is stored as CSR, run as CSR @ im2col patches.

    ``layout`` "batched" multiplies the patches of all images at once (one product, a transpose
    of the patches); "per_image" multiplies each image's patches (no transpose, B products).
    """

    LAYOUTS = ("batched", "per_image")

    def __init__(self, conv: nn.Conv2d, layout: str = "batched") -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d takes ungrouped convs with numeric zero padding")
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, not {layout!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.layout = layout
        self._store(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def _out_size(self, size: int, i: int) -> int:
        span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
        return (size + 2 * self.padding[i] - span) // self.stride[i] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        height, width = self._out_size(x.shape[2], 0), self._out_size(x.shape[3], 1)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # B, K, L
        if self.layout == "batched":
            flat = cols.transpose(0, 1).reshape(self.k, -1)  # K, B L
            out = csr_matmul(self.crow, self.col, self.values, flat)
            out = out.reshape(self.out_channels, batch, -1).transpose(0, 1)
        else:
            out = csr_matmul(self.crow, self.col, self.values, cols)  # B, N, L
        out = out.reshape(batch, self.out_channels, height, width)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        if x.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous(memory_format=torch.channels_last)
        return out.contiguous()

    def dense_equivalent(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the same outputs."""
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
        )
        weight = self._matrix().reshape(layer.weight.shape)
        return self._dense_layer(layer, weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, nnz={self.nnz}, layout={self.layout}"
        )


class SemiStructuredLinear(nn.Module):
    """A linear layer with a 2:4 semi-structured weight (CUDA, fp16/bf16 kernels of torch)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._dense = linear.weight.detach().clone()
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def stored_values(self) -> int:
        return self._dense.numel() // 2 + (0 if self.bias is None else self.bias.numel())

    def stored_bytes(self) -> int:
        # half the values, plus 2 bits of metadata per kept value
        size = self._dense.element_size()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self._dense.numel() // 2 * size + self._dense.numel() // 16 + bias

    def dense_equivalent(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self._dense)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.to(self._dense.device).eval()


def is_sparse_module(module: nn.Module) -> bool:
    """A layer of this pass that stores only its weight's nonzeros (CSR or 2:4). Other modules
    with ``stored_bytes`` (``bench.deploy.fused``'s padded and recomposed pairs) are not sparse."""
    return isinstance(module, _CSRWeight | SemiStructuredLinear)


# ----------------------------------------------------------------------------------- choosing
def zero_fraction(module: nn.Module) -> float:
    """Share of exact zeros in ``module.weight`` (0 for a module without one)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_sparse:
        return 0.0
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def _candidate(module: nn.Module) -> bool:
    if getattr(module, _CHOICE, None) is not None:
        return False
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    elif not isinstance(module, nn.Linear):
        return False
    return zero_fraction(module) >= MIN_ZEROS


def _is_two_four(weight: torch.Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.shape[0] % 32 or weight.shape[1] < 64:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(1) <= 2).all())


def _forms(module: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """The sparse forms of ``module`` worth timing on ``device``, by label."""
    forms: dict[str, nn.Module] = {}
    if device.type == "cpu":
        if isinstance(module, nn.Conv2d):
            for layout in SparseConv2d.LAYOUTS:
                forms[f"sparse CSR ({layout})"] = SparseConv2d(module, layout)
        else:
            forms["sparse CSR"] = SparseLinear(module)
    elif device.type == "cuda" and isinstance(module, nn.Linear) and _is_two_four(module.weight):
        with contextlib.suppress(RuntimeError, ValueError, ImportError):  # no kernel here
            forms["2:4 semi-structured"] = SemiStructuredLinear(module)
    return {label: form.to(device).eval() for label, form in forms.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_interleaved(
    forms: dict[str, nn.Module], x: torch.Tensor, min_run_time: float, device: torch.device
) -> dict[str, float]:
    """Median ms of each form on ``x``, the forms run in turn (same machine state for each)."""
    samples: dict[str, list[float]] = {label: [] for label in forms}
    for form in forms.values():  # warm-up
        form(x)
    start = time.perf_counter()
    while True:
        for label, form in forms.items():
            _sync(device)
            t0 = time.perf_counter()
            form(x)
            _sync(device)
            samples[label].append(time.perf_counter() - t0)
        rounds = len(next(iter(samples.values())))
        if rounds >= 3 and time.perf_counter() - start >= min_run_time * len(forms):
            break
    return {label: statistics.median(s) * 1e3 for label, s in samples.items()}


@torch.no_grad()
def sparsify(model: nn.Module, input_shape: tuple[int, ...] | None, timing: Any) -> dict[str, str]:
    """Put each sparse-enough layer of ``model`` (in place, eval mode) in its fastest measured form.

    Args:
        model: a deployed (baked) model.
        input_shape: C, H, W of one input; with ``timing`` None nothing is chosen.
        timing: a ``bench.deploy.Timing`` (device, batch, threads, seconds per form).

    Returns:
        A note per candidate layer: the form chosen and the timings behind the choice.
    """
    if timing is None or input_shape is None:
        return {}
    notes = {
        name: f"dense: nnz {1 - zeros:.0%}, too dense to try sparse (< {MIN_ZEROS:.0%} zeros)"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
        and getattr(module, _CHOICE, None) is None
        and 0.01 <= (zeros := zero_fraction(module)) < MIN_ZEROS
    }
    names = [name for name, module in model.named_modules() if _candidate(module)]
    if not names:
        return notes
    device = torch.device(timing.device)
    threads = torch.get_num_threads()
    if timing.threads:
        torch.set_num_threads(timing.threads)
    try:
        model.to(device)
        x = torch.randn(timing.batch_size, *input_shape, device=device)
        if x.dim() == 4:  # as the latency timer runs a conv net
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        inputs = layer_inputs(model, names, x)
        for name in names:
            if name not in inputs:  # never reached by the forward pass: nothing to time
                continue
            notes[name] = _choose(model, name, inputs[name], timing, device)
    finally:
        torch.set_num_threads(threads)
    model.to(memory_format=torch.contiguous_format)
    return notes


def _choose(model: nn.Module, name: str, x: torch.Tensor, timing: Any, device: torch.device) -> str:
    """Time ``name``'s forms at its input ``x``; install the fastest; the note that says why."""
    dense = model.get_submodule(name)
    nnz = 1.0 - zero_fraction(dense)
    reference = dense(x)
    forms = {}
    for label, form in _forms(dense, device).items():
        if torch.allclose(form(x), reference, rtol=1e-4, atol=1e-4):
            forms[label] = form
    if not forms:
        setattr(dense, _CHOICE, "dense")
        return f"dense: no sparse form for this layer on {device.type} (nnz {nnz:.0%})"
    times = _time_interleaved({"dense": dense, **forms}, x, timing.min_run_time, device)
    dense_ms = times.pop("dense")
    label = min(times, key=times.get)
    if times[label] < dense_ms:
        set_module(model, name, forms[label])
        return f"{label} (nnz {nnz:.0%}): {times[label]:.2f} ms vs dense {dense_ms:.2f} ms"
    setattr(dense, _CHOICE, "dense")
    return f"dense: faster than {label} ({dense_ms:.2f} vs {times[label]:.2f} ms, nnz {nnz:.0%})"


def describe(model: nn.Module, min_zeros: float = 0.01) -> str:
    """What was deployed: "structured" when every stored weight executes at its nonzero count
    (no layer multiplies stored zeros), else e.g. "masked dense: 13 layers; sparse: 2 layers".

    A conv or linear layer whose weight is at least ``min_zeros`` zeros counts as masked dense.
    """
    # the layers inside a module that says what it stores (a rank-padded pair: its zeros are
    # padding, not stored) are described by that module
    owners = [
        name + "."
        for name, m in model.named_modules()
        if callable(getattr(m, "stored_bytes", None)) and not is_sparse_module(m)
    ]
    masked = sum(
        isinstance(m, nn.Conv2d | nn.Linear)
        and zero_fraction(m) >= min_zeros
        and not any(name.startswith(o) for o in owners)
        for name, m in model.named_modules()
    )
    sparse = sum(is_sparse_module(m) for m in model.modules())
    if masked == 0 and sparse == 0:
        return "structured"
    parts = [f"masked dense: {masked} layers"] if masked else []
    return "; ".join(parts + ([f"sparse: {sparse} layers"] if sparse else []))
