"""Does every method handle the timm CNNs? A script that prints the model x method table.

Each model is built with random weights (``bench.models.create_model``, ``--classes`` outputs,
CIFAR-sized ``3 x --size x --size`` input) and compressed by every registered method at each
``--ratios`` target, without fine-tuning (``methods.base.no_finetune``) and with a few synthetic
calibration batches (``CalibData.synthetic``): this checks structure and reach, not accuracy.
Each cell is the achieved params ratio (dense / stored params) and the seconds the compression
took, or the method's one-line "out of reach" reason. Usage::

    python benchmarks/timm_zoo.py                        # the six models of issue 12, 2x and 4x
    python benchmarks/timm_zoo.py --models regnetx_002 --methods l1_filter,svd --ratios 2
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import bench.models
import methods
from methods.base import (
    CalibData,
    CompressionWarning,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
    stored_params,
)

MODELS = (
    "resnet18",
    "mobilenetv2_100",
    "efficientnet_b0",
    "regnetx_002",
    "convnext_atto",
    "densenet121",
)


def compress_once(
    dense: torch.nn.Module, method: str, ratio: float, data: CalibData, seed: int = 0
) -> tuple[torch.nn.Module | None, str, float]:
    """Compress a copy of ``dense``: (model or None, achieved ratio or the error, seconds)."""
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompressionWarning)
            out = create_method(method).compress(model, Target(ratio=ratio), data, no_finetune())
    except MethodConfigError as error:
        return None, str(error), time.perf_counter() - start
    seconds = time.perf_counter() - start
    return out, f"{count_params(dense) / stored_params(out):.2f}x", seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(methods.list_methods()))
    parser.add_argument("--ratios", default="2,4")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="input height and width (pixels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: many small ops)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (3, args.size, args.size)
    data = CalibData.synthetic(shape, args.classes, n_batches=2, batch_size=8)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"| model | params | method | {' | '.join(f'{r:g}x' for r in ratios)} |")
    print("|---|---|---|" + "---|" * len(ratios))
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = bench.models.create_model(name, num_classes=args.classes, in_chans=3).eval()
        x = torch.randn(2, *shape)
        for method in args.methods.split(","):
            cells = []
            for ratio in ratios:
                out, text, seconds = compress_once(dense, method, ratio, data)
                if out is not None:
                    with torch.no_grad():
                        y = out.eval()(x)
                    if y.shape != (2, args.classes) or not torch.isfinite(y).all():
                        text += " BROKEN OUTPUT"
                cells.append(f"{text} ({seconds:.1f} s)")
            print(f"| {name} | {count_params(dense) / 1e6:.2f}M | {method} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
