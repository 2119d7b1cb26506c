"""Do params and MACs reductions turn into measured speedups? A script that prints a table.

For each model, method and ratio it compresses a randomly initialised model (weights do not change
cost) with ``CalibData.synthetic`` and ``no_finetune()``, then reports, against the dense model:

- params ratio: dense params / the method's stored params (what the target constrains);
- MACs x: dense / compressed MACs (``bench.footprint.count_macs``: what the deployed model
  executes, FlopCounterMode FLOPs / 2);
- MACs_nz x: dense / compressed multiply-accumulates that touch a stored nonzero weight (the
  pruning papers' "FLOPs" for unstructured methods; :func:`macs_nz` below);
- measured speedups, one column per backend: dense / compressed median latency of the deployed
  models (``bench.deploy.deploy``), timed interleaved (``bench.footprint.compare_latencies``):
  torch on ``--device`` (CPU: ``torch.utils.benchmark``, channels_last; CUDA: CUDA events), and
  ONNX Runtime's CPU session on the ONNX export (checked against PyTorch to 1e-4), same threads;
- <backend> / MACs: measured speedup / MACs speedup (1 = every MAC saved is time saved).

Usage::

    python benchmarks/speedup.py --threads 2                      # vgg16_bn_cifar, resnet56_cifar
    python benchmarks/speedup.py --models vgg16_bn_cifar --width 0.25 --methods svd --ratios 4
    python benchmarks/speedup.py --device cuda --backends torch   # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bench.models
import methods
from bench.deploy import deploy
from bench.footprint import compare_latencies, count_macs, latency_cases
from bench.study import LatencyConfig, StudyError
from bench.testing import compress_quietly
from methods.base import CalibData, MethodConfigError, Target, count_params, stored_params


@torch.no_grad()
def macs_nz(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image that touch a stored nonzero weight: each conv / linear
    leaf of the deployed model counts its FlopCounterMode MACs x its weight's nonzero fraction
    (exact for convs and linears: every weight is used once per output position); other ops
    count as they execute.

    A local stand-in for ``bench.footprint.count_macs_nz`` (helper "sparse" of issue 13); the
    merge replaces this function by that one.
    """
    model = deploy(model).model
    counter = FlopCounterMode(display=False)
    param = next(model.parameters())
    with counter:
        model(torch.randn(1, *input_shape, device=param.device))
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total = counter.get_total_flops() // 2
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and module.weight.numel():
            macs = sum(per_module.get(f"{root}.{name}" if name else root, {}).values()) // 2
            zeros = 1 - int(module.weight.count_nonzero()) / module.weight.numel()
            total -= round(macs * zeros)
    return int(total)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16_bn_cifar,resnet56_cifar", help="comma list")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (CIFAR)")
    parser.add_argument("--methods", default=None, help="comma list (default: every method)")
    parser.add_argument("--ratios", default="2,4,8", help="comma list of params ratios")
    parser.add_argument("--batch", type=int, default=32, help="latency batch size (images)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch backend's device: cpu, cuda")
    parser.add_argument("--backends", default="torch,onnxruntime", help="comma list")
    parser.add_argument("--image", type=int, default=32, help="input height = width (pixels)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shape = (3, args.image, args.image)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
        names = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
        names = names or methods.list_methods()
        for name in names:
            methods.get_method_class(name)
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        LatencyConfig(device=args.device, batch_sizes=(args.batch,), backends=backends)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device on this machine")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for model in models:
            bench.models.create_model(model, num_classes=args.num_classes, in_chans=3)
    except (ValueError, MethodConfigError, StudyError, bench.models.ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cases = latency_cases(args.device, (args.batch,), backends)
    data = CalibData.synthetic(shape, args.num_classes, n_batches=2, batch_size=32)
    for model_name in models:
        torch.manual_seed(0)
        dense = bench.models.create_model(
            model_name, num_classes=args.num_classes, in_chans=3, width=args.width
        ).eval()
        dense_macs, dense_nz = count_macs(dense, shape), macs_nz(dense, shape)
        print(
            f"\n{model_name} (width {args.width or 1.0}): {count_params(dense) / 1e6:.3f}M "
            f"params, {dense_macs / 1e6:.1f}M MACs; latency: batch {args.batch}, {threads} "
            f"thread(s), dense and compressed deployed and timed interleaved, "
            + ", ".join(f"{c.backend} on {c.device}" for c in cases)
            + "\n"
        )
        rows = []
        for name in names:
            for ratio in ratios:
                row = {"model": model_name, "method": name, "target": ratio}
                method = methods.create_method(name)
                try:
                    model = compress_quietly(
                        method, copy.deepcopy(dense), Target(ratio=ratio), data
                    ).eval()
                except MethodConfigError as err:
                    rows.append({**row, "note": str(err)[:80]})
                    continue
                macs_x = dense_macs / count_macs(model, shape)
                row |= {
                    "params ratio": count_params(dense) / stored_params(model),
                    "MACs x": macs_x,
                    "MACs_nz x": dense_nz / macs_nz(model, shape),
                }
                results = compare_latencies(
                    dense, model, shape, cases, threads=threads, min_run_time=args.min_run_time
                )
                for case, (dense_ms, ms) in results.items():
                    label = f"{case.backend}-{case.device}"
                    row[f"{label} x"] = dense_ms / ms
                    row[f"{label} / MACs"] = dense_ms / ms / macs_x
                rows.append({**row, "note": ""})
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
