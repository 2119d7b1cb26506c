"""The deployed model in ONNX Runtime: export (opset pinned), check against PyTorch, time.

:func:`export` writes a deployed model (``bench.deploy.deploy``) as ONNX bytes with a dynamic
batch axis, so one export serves every latency batch. A module with a custom forward (a sparse
kernel) offers ``dense_equivalent()``, a plain module with the same outputs; the export swaps it
in, since ONNX has no op for our kernels. :func:`check` runs the exported graph in ONNX Runtime
and compares it with PyTorch: outputs must agree to ``ATOL`` or the run fails
(:class:`OnnxMismatch`, one line). :func:`session` is an ONNX Runtime CPU session with a fixed
intra-op thread count (the same threads as the PyTorch timing).

The exporter: torch's TorchScript-based one (``dynamo=False``). Measured here (torch 2.14,
vgg16_bn_cifar width 0.125): 0.08 s per export after the first (1.0 s), against 3.5-6 s for
the ``torch.export``-based one, which would cost a second per trial and per method test. Both
give the same ONNX ops for conv nets; where the TorchScript exporter is gone (a later torch),
the dynamo one is used.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["ATOL", "OPSET", "RTOL", "OnnxMismatch", "check", "export", "for_export", "session"]

OPSET = 18  # pinned: a newer torch must not change the graph a latency was measured on
# |ONNX Runtime - PyTorch| <= ATOL + RTOL * |PyTorch| for every output (float32, eval mode): the
# contract's deployed-outputs tolerance (torch.allclose); a deep random-init net's logits reach
# the hundreds, where float32 reordering alone leaves more than 1e-4 absolute
ATOL = RTOL = 1e-4


class OnnxMismatch(RuntimeError):
    """The exported graph's outputs differ from PyTorch's; the message is one line."""


def for_export(model: nn.Module) -> nn.Module:
    """``model`` (left unchanged) with every module that offers ``dense_equivalent()`` replaced by
    it: a plain module with the same outputs, which ONNX can express."""
    if not any(hasattr(m, "dense_equivalent") for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    if hasattr(model, "dense_equivalent"):
        return model.dense_equivalent()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "dense_equivalent"):
                setattr(module, child_name, child.dense_equivalent())
    return model


@torch.no_grad()
def export(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of the eval-mode ``model`` on CPU for inputs (N, *input_shape), N dynamic."""
    model = for_export(model).cpu().eval()
    example = torch.randn(2, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation on every call: noise here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buf,
                opset_version=OPSET,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
        except TypeError:  # no TorchScript exporter any more: torch.export's
            program = torch.onnx.export(
                model,
                (example,),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            return program.model_proto.SerializeToString()
    return buf.getvalue()


def session(onnx_bytes: bytes, threads: int):
    """An ONNX Runtime CPU ``InferenceSession`` with ``threads`` intra-op threads (one
    inter-op thread), full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check(model: nn.Module, sess, input_shape: tuple[int, ...], batch_size: int = 2) -> float:
    """Max |ONNX Runtime - PyTorch| of the outputs on a random batch; raises
    :class:`OnnxMismatch` where an output differs by more than ``ATOL + RTOL * |PyTorch|``."""
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    expected = model.eval()(x.to(device)).float().cpu().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != expected.shape:
        raise OnnxMismatch(
            f"ONNX export of {type(model).__name__}: output shape {got.shape}, PyTorch "
            f"{expected.shape}"
        )
    diff = np.abs(got - expected)
    err = float(diff.max()) if got.size else 0.0
    if not np.all(diff <= ATOL + RTOL * np.abs(expected)):  # NaN fails too
        raise OnnxMismatch(
            f"ONNX export of {type(model).__name__} differs from PyTorch by {err:.3g} "
            f"(allowed {ATOL:g} + {RTOL:g} x |output|, opset {OPSET})"
        )
    return err
