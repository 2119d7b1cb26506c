"""Do params and MACs reductions turn into measured CPU speedups? A script that prints a table.

For each method and ratio it compresses a randomly initialised model (weights do not change cost)
with ``CalibData.synthetic`` and ``no_finetune()``, then reports, against the dense model:

- params ratio: dense params / the method's stored params (what the target constrains);
- MACs speedup: dense / compressed MACs (``bench.footprint.count_macs``, FlopCounterMode FLOPs / 2);
- latency speedup: dense / compressed median CPU latency (``bench.footprint.measure_latency``:
  torch.utils.benchmark.Timer, warm-up, same threads and batch, channels_last);
- efficiency: latency speedup / MACs speedup (1 = every MAC saved is time saved).

Usage::

    python benchmarks/speedup.py --model vgg16_bn_cifar --width 0.5 --ratios 2,4,8 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

import bench.models
import methods
from bench.footprint import count_macs, measure_latency
from bench.testing import compress_quietly
from methods.base import (
    CalibData,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    stored_params,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_bn_cifar", help="timm / bench.models name")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (CIFAR)")
    parser.add_argument("--methods", default="freq_lowrank,dct_pruning,svd,lrsd")
    parser.add_argument("--ratios", default="2,4,8", help="comma list of params ratios")
    parser.add_argument("--batch", type=int, default=32, help="latency batch size (images)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
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
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        for name in names:
            methods.get_method_class(name)
        torch.manual_seed(0)
        dense = bench.models.create_model(
            args.model, num_classes=args.num_classes, in_chans=3, width=args.width
        ).eval()
    except (ValueError, MethodConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = CalibData.synthetic(shape, args.num_classes, n_batches=2, batch_size=32)
    timing = {"batch_size": args.batch, "threads": threads, "min_run_time": args.min_run_time}
    dense_macs = count_macs(dense, shape)
    dense_ms = measure_latency(dense, shape, **timing)
    print(
        f"{args.model} (width {args.width or 1.0}): {count_params(dense) / 1e6:.3f}M params, "
        f"{dense_macs / 1e6:.1f}M MACs, {dense_ms:.1f} ms per batch of {args.batch} "
        f"({threads} thread(s), channels_last)\n"
    )
    rows = []
    for name in names:
        for ratio in ratios:
            row = {"method": name, "target": ratio}
            method = create_method(name)
            try:
                model = compress_quietly(method, copy.deepcopy(dense), Target(ratio=ratio), data)
                model.eval()
            except MethodConfigError as err:
                rows.append({**row, "note": str(err)})
                continue
            macs_speedup = dense_macs / count_macs(model, shape)
            latency_speedup = dense_ms / measure_latency(model, shape, **timing)
            rows.append(
                {
                    **row,
                    "params ratio": count_params(dense) / stored_params(model),
                    "MACs speedup": macs_speedup,
                    "latency speedup": latency_speedup,
                    "latency / MACs": latency_speedup / macs_speedup,
                    "note": "" if method.structured else "unstructured part: dense MACs",
                }
            )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
