"""What CPU sparsity really buys here: a VGG-style 3x3 conv, dense vs CSR, per sparsity.

For each layer geometry (full-width vgg16_bn_cifar's conv shapes at their CIFAR spatial sizes) and
each share of zeros, the conv's weight is zeroed at random and timed (median, interleaved) as a
dense ``F.conv2d`` and in both layouts of ``bench.deploy.sparse.SparseConv2d`` (CSR weight @
im2col patches), at the latency batch and threads. Prints speedup = dense / sparse: above 1, the
sparse form would be chosen by ``bench.deploy``. Usage::

    python benchmarks/sparse_layers.py                      # batch 32, 2 threads
    python benchmarks/sparse_layers.py --batch-size 1 --threads 1 --sparsity 0.9,0.99
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch import nn

from bench.deploy.sparse import SparseConv2d, _time_interleaved

# (in channels, out channels, spatial size): vgg16_bn_cifar's conv stages on 32 x 32 inputs
LAYERS = ((64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4), (512, 512, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", default="0.5,0.8,0.9,0.95,0.98,0.99")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per form")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shares = [float(s) for s in args.sparsity.split(",")]
    rows = []
    with torch.no_grad():
        for cin, cout, size in LAYERS:
            x = torch.randn(args.batch_size, cin, size, size)
            x = x.contiguous(memory_format=torch.channels_last)
            row = [f"{cout}x{cin}x3x3 @ {size}x{size}"]
            for share in shares:
                conv = nn.Conv2d(cin, cout, 3, padding=1).eval()
                conv.weight[torch.rand_like(conv.weight) < share] = 0
                conv = conv.to(memory_format=torch.channels_last)
                forms = {"dense": conv}
                forms |= {layout: SparseConv2d(conv, layout) for layout in SparseConv2d.LAYOUTS}
                ms = _time_interleaved(forms, x, args.min_run_time, torch.device("cpu"))
                best = min(ms[layout] for layout in SparseConv2d.LAYOUTS)
                row.append(f"{ms['dense'] / best:.2f}")
            rows.append(row)
    print(
        f"speedup of CSR over dense conv (dense ms / best CSR layout ms), batch {args.batch_size},"
        f" {args.threads} threads, channels-last input"
    )
    print(tabulate(rows, headers=["layer"] + [f"{s:.0%} zeros" for s in shares]))


if __name__ == "__main__":
    main()
