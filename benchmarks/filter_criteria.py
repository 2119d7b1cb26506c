"""Which filters does each pruning criterion keep, and does it matter? A script that prints a table.

Every structured method prunes the study's trained baseline (cached under ``results/``; trained
first when missing) to the SAME per-layer filter counts (``uniform`` allocation at ``--ratio``), so
only the choice of filters differs. For each criterion it prints validation top-1 right after
pruning with the harness's BatchNorm re-estimation (and without it), next to two controls:

- the same criterion inverted (keep the LOWEST scores): a criterion that carries information beats
  its own inversion;
- ``random`` filters, mean ± std over ``--draws`` draws: the floor.

and the Spearman rank correlation of each criterion's scores with the filters' L1 norms, per layer
(median over layers). No fine-tuning: this isolates the criterion. Usage::

    python benchmarks/filter_criteria.py --study quickstart --ratio 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from bench.paths import default_tracking_uri
from bench.runner import Sweep, resolve_device
from bench.study import load_study
from bench.tracking import Tracker
from bench.training import evaluate, recalibrate_bn
from methods.base import CalibData, CompressionWarning, Target
from methods.dct_pruning import DCTPruning
from methods.l1_filter import L1Filter
from methods.random_pruning import RandomPruning

CRITERIA = {
    "dct_pruning band=full": (DCTPruning, {"band": "full"}),
    "dct_pruning band=low (0.5)": (DCTPruning, {"band": "low", "band_fraction": 0.5}),
    "dct_pruning band=low (0.25)": (DCTPruning, {"band": "low", "band_fraction": 0.25}),
    "l1_filter": (L1Filter, {}),
}


def variant(cls, *, invert: bool = False):
    """``cls`` that remembers each layer's (scores, filter L1 norms) as it prunes; ``invert`` keeps
    the lowest-scoring filters instead of the highest (scores stay >= 0)."""

    class Variant(cls):
        def filter_scores(self, prunable):
            scores = super().filter_scores(prunable)
            l1 = [conv.weight.detach().abs().sum(dim=(1, 2, 3)) for _, conv in prunable.layers]
            self.seen = list(zip(scores, l1, strict=True))
            return [s.max() - s for s in scores] if invert else scores

    return Variant


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.double().argsort().argsort(), b.double().argsort().argsort()])
    return float(torch.corrcoef(ranks.double())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="quickstart", help="study whose baseline is pruned")
    ap.add_argument("--ratio", type=float, default=2.0, help="params ratio (uniform allocation)")
    ap.add_argument("--seed", type=int, default=0, help="baseline seed")
    ap.add_argument("--bn-batches", type=int, default=20, help="BatchNorm re-estimation batches")
    ap.add_argument("--draws", type=int, default=3, help="random draws")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", CompressionWarning)

    study = load_study(args.study)
    tracker = Tracker(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(), study.name)
    sweep = Sweep(study, tracker, device=resolve_device("cpu"))
    base = sweep.baseline(args.seed)
    splits, target = sweep.splits, Target.parse(args.ratio)
    batch = study.finetune.batch_size

    def calib(seed: int) -> CalibData:
        gen = torch.Generator().manual_seed(seed)
        return CalibData(
            lambda: splits.train.batches(batch, shuffle=True, augment=True, generator=gen),
            sweep.input_shape,
            sweep.info.num_classes,
            sweep.device,
        )

    def accuracy(method, seed: int = 0) -> tuple[float, float, list[int]]:
        torch.manual_seed(seed)
        model = method.compress(sweep.load_baseline(base), target, calib(seed), None)
        raw = evaluate(model, splits.val)["top1"]
        recalibrate_bn(model, splits.train, batches=args.bn_batches, batch_size=batch,
                       generator=torch.Generator().manual_seed(seed + 2))  # fmt: skip
        counts = [row["filters_after"] for row in method.layer_table(model)]
        return raw, evaluate(model, splits.val)["top1"], counts

    rows, counts_seen = [], set()
    for label, (cls, kwargs) in CRITERIA.items():
        kwargs = {**kwargs, "allocation": "uniform"}
        method = variant(cls)(**kwargs)
        raw, recal, counts = accuracy(method)
        _, inv, inv_counts = accuracy(variant(cls, invert=True)(**kwargs))
        counts_seen |= {tuple(counts), tuple(inv_counts)}
        rho = [spearman(scores, l1) for scores, l1 in method.seen]
        rows.append(
            {
                "criterion": label,
                "val top-1 (BN re-est.)": recal,
                "inverted (keep lowest)": inv,
                "val top-1 (stale BN)": raw,
                "Spearman vs L1 (median)": statistics.median(rho),
            }
        )
    draws, stale = [], []
    for d in range(args.draws):
        raw, recal, counts = accuracy(RandomPruning(allocation="uniform"), seed=d)
        counts_seen.add(tuple(counts))
        draws.append(recal)
        stale.append(raw)
    spread = statistics.stdev(draws) if len(draws) > 1 else 0.0
    rows.append(
        {
            "criterion": f"random (mean of {len(draws)}; std {spread:.2f})",
            "val top-1 (BN re-est.)": statistics.mean(draws),
            "inverted (keep lowest)": float("nan"),
            "val top-1 (stale BN)": statistics.mean(stale),
            "Spearman vs L1 (median)": float("nan"),
        }
    )
    assert len(counts_seen) == 1, f"per-layer counts differ between criteria: {counts_seen}"
    print(
        f"{study.model} w{study.width} on {study.dataset}, baseline val {base.val_top1:.2f} %, "
        f"ratio {args.ratio:g} (uniform; same filters per layer for all: "
        f"{list(next(iter(counts_seen)))}), no fine-tuning, BN re-estimated on "
        f"{args.bn_batches} batches\n"
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
