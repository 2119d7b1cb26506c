"""Time the harness's training loop against a bare PyTorch loop: same model, batch, threads, data.

The bare loop is what a person would write by hand: tensors already in memory, a random permutation,
random crop + flip as tensor ops, SGD; no progress bar, no per-epoch evaluation. The harness loop is
``bench.training.train`` on ``bench.data``'s in-memory split (its own augmentation, channels_last,
LR schedule, on-device metric accumulation). Goal: harness throughput / bare throughput >= 0.9.

    python benchmarks/train_loop.py [--model vgg16_bn_cifar] [--width 0.25] [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.data import load_splits
from bench.models import create_model
from bench.study import Recipe
from bench.training import train


def bare_loop(model, images, labels, *, batch, steps, lr, channels_last) -> float:
    """Seconds for ``steps`` SGD steps written by hand; images are normalised float tensors."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    n = len(images)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            if done >= steps:
                break
            idx = perm[i : i + batch]
            x = images[idx]
            # random crop (pad 2) + horizontal flip, batched
            x = F.pad(x, (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
            x = x[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16_bn_cifar")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits(args.dataset, train_subset=args.batch * args.steps)
    info = splits.info
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    images = (splits.train.images.float() / 255 - mean) / std
    labels = splits.train.labels
    per_epoch = splits.train.num_batches(args.batch, drop_last=True)
    recipe = Recipe(epochs=args.steps / per_epoch, lr=0.01, batch_size=args.batch)

    def fresh():
        torch.manual_seed(0)
        model = create_model(
            args.model, num_classes=info.num_classes, in_chans=info.in_chans, width=args.width
        )
        return model.to(memory_format=torch.channels_last)

    bare, harness = [], []
    # warm-up both paths once (allocator, oneDNN primitives), then alternate to share any drift
    bare_loop(fresh(), images, labels, batch=args.batch, steps=5, lr=0.01, channels_last=True)
    train(fresh(), splits.train, Recipe(epochs=5 / per_epoch, lr=0.01, batch_size=args.batch))
    for _ in range(args.repeats):
        bare.append(
            bare_loop(
                fresh(),
                images,
                labels,
                batch=args.batch,
                steps=args.steps,
                lr=0.01,
                channels_last=True,
            )
        )
        model = fresh()
        t0 = time.perf_counter()
        train(model, splits.train, recipe)
        harness.append(time.perf_counter() - t0)
    b, h = min(bare), min(harness)
    imgs = args.steps * args.batch
    print(
        f"{args.model} w{args.width} on {args.dataset}, batch {args.batch}, {args.steps} steps, "
        f"{args.threads} threads (best of {args.repeats})"
    )
    print(f"bare PyTorch loop : {b:7.2f} s  {imgs / b:8.0f} img/s")
    print(f"harness loop      : {h:7.2f} s  {imgs / h:8.0f} img/s")
    print(f"harness / bare throughput: {b / h:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
