"""Why ``methods._lowrank.thin_svd`` transposes wide matrices: prints the seconds of
``torch.linalg.svd(full_matrices=False)`` on a wide conv weight matrix and on its transpose.

Usage::

    python benchmarks/svd_orientation.py --rows 512 --cols 4608 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="output channels N")
    parser.add_argument("--cols", type=int, default=4608, help="C k^2 (512 x 3 x 3 = 4608)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    matrix = torch.randn(args.rows, args.cols, dtype=torch.float64, generator=torch.Generator())
    times = {"wide": [], "tall (transposed)": []}
    for _ in range(args.repeats):  # interleaved: both under the same machine state
        for label, m in (("wide", matrix), ("tall (transposed)", matrix.T)):
            t0 = time.perf_counter()
            torch.linalg.svd(m, full_matrices=False)
            times[label].append(time.perf_counter() - t0)
    wide, tall = (min(v) for v in times.values())
    print(f"{args.rows} x {args.cols} float64, {torch.get_num_threads()} thread(s)")
    print(f"wide: {wide:.2f} s, tall: {tall:.2f} s, ratio {wide / tall:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
