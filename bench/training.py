"""One training loop for baselines and fine-tuning, and the evaluation that goes with it.

SGD (Nesterov momentum, weight decay) under a study ``Recipe``; the data are in-memory tensors and
augmentation is batched tensor ops (``bench.data``), so the loop is as short as a bare PyTorch loop
(``benchmarks/train_loop.py`` measures the overhead). Conv nets run in channels_last on CPU: 15-40 %
faster here. A non-finite loss stops training with :class:`NonFiniteLoss`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.dataset_info import DataError
from bench.study import Recipe

__all__ = [
    "EpochResult",
    "NonFiniteLoss",
    "evaluate",
    "progress_enabled",
    "recalibrate_bn",
    "train",
]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (the message says at which step)."""


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one epoch. Accuracies in percent; ``val_top1`` is None without validation."""

    epoch: int
    train_loss: float
    train_top1: float
    val_top1: float | None
    lr: float

    def metrics(self) -> dict[str, float]:
        out = {"train_loss": self.train_loss, "train_top1": self.train_top1, "lr": self.lr}
        if self.val_top1 is not None:
            out["val_top1"] = self.val_top1
        return out


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never under CI=true or TQDM_DISABLE."""
    if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("TQDM_DISABLE"):
        return False
    return sys.stderr.isatty()


def _lr_at(recipe: Recipe, step: int, total: int) -> float:
    if recipe.schedule == "constant" or total <= 0:
        return recipe.lr
    frac = step / total
    if recipe.schedule == "step":  # DCTPruning: x0.1 at 1/3 and 2/3 of the run
        return recipe.lr * (0.1 ** (int(frac >= 1 / 3) + int(frac >= 2 / 3)))
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * frac))


def _channels_last(model: nn.Module, device: torch.device) -> bool:
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def evaluate(
    model: nn.Module, split, *, batch_size: int = 512, topk: tuple[int, ...] = (1,)
) -> dict:
    """Top-k accuracies (percent) and mean loss on a split: eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cl = _channels_last(model, device)
    correct = dict.fromkeys(topk, 0)
    loss_sum, n = 0.0, 0
    for x, y in split.batches(batch_size, shuffle=False, augment=False, channels_last=cl):
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(max(topk), dim=1).indices
        hits = top == y.unsqueeze(1)
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        n += len(y)
    model.train(was_training)
    if n == 0:  # an accuracy of 0 % would read as a result
        raise DataError(f"cannot evaluate on an empty split ({split!r})")
    out = {f"top{k}": 100.0 * correct[k] / n for k in topk}
    out["loss"] = loss_sum / n
    return out


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    split,
    *,
    batches: int,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches.

    Removing filters or truncating ranks shifts each layer's output distribution, so the running
    means and variances the dense model learned no longer fit: structured methods then score at
    chance before fine-tuning although their weights are fine (quickstart, l1_filter at 2x: 10 %
    before, 70 % after). Only the BatchNorm layers run in train mode, with a cumulative average
    (``momentum=None``); weights, masks, dropout and every other module are untouched. Returns the
    number of BatchNorm layers re-estimated (0: nothing to do, the model is left as it was).
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms or batches <= 0:
        return 0
    was_training = model.training
    device = next(model.parameters()).device
    cl = _channels_last(model, device)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for x, _ in split.batches(
            batch_size, shuffle=True, augment=True, generator=generator, channels_last=cl
        ):
            if len(x) < 2:  # a one-image batch has no variance (BatchNorm1d refuses it)
                continue
            model(x)
            seen += 1
            if seen >= batches:
                break
    finally:
        for m, (momentum, mean, var) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if not seen:  # nothing was seen (an interrupt, a split too small): as it was
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        model.train(was_training)
    return len(norms) if seen else 0


def train(
    model: nn.Module,
    train_split,
    recipe: Recipe,
    *,
    epochs: float | None = None,
    val_split=None,
    regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None,
    generator: torch.Generator | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    desc: str = "train",
) -> list[EpochResult]:
    """Train ``model`` in place; returns one :class:`EpochResult` per (possibly partial) epoch.

    Args:
        epochs: overrides ``recipe.epochs``; fractions train that share of an epoch's steps.
        val_split: evaluated after every epoch (for early stopping and pruners, never test data).
        regularizer: extra loss term, e.g. a method's L1 penalty in the DCT domain.
        on_epoch: called after each epoch; may raise to stop (an Optuna pruner does).
    """
    epochs = recipe.epochs if epochs is None else epochs
    per_epoch = train_split.num_batches(recipe.batch_size, drop_last=True)
    if per_epoch == 0 and epochs > 0:  # bench.study.check_data says so earlier where it can
        raise DataError(
            f"{desc}: the training split has {len(train_split)} images, fewer than one batch of "
            f"{recipe.batch_size} (the last partial batch is dropped): nothing would be trained; "
            "lower the batch size"
        )
    total = round(epochs * per_epoch)
    if total <= 0:
        return []
    device = next(model.parameters()).device
    cl = _channels_last(model, device)
    if cl:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.momentum > 0,
        weight_decay=recipe.weight_decay,
    )
    history: list[EpochResult] = []
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress_enabled(), leave=False)
    epoch = 0
    while step < total:
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batches = train_split.batches(
            recipe.batch_size,
            shuffle=True,
            augment=True,
            generator=generator,
            drop_last=True,
            channels_last=cl,
        )
        for x, y in batches:
            if step >= total:
                break
            lr = _lr_at(recipe, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            if regularizer is not None:
                extra = regularizer(model)
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # accumulate on-device: one host sync per epoch, not per step
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            step += 1
            bar.update(1)
        epoch += 1
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            bar.close()
            raise NonFiniteLoss(f"{desc}: training loss became {train_loss} in epoch {epoch}")
        val = evaluate(model, val_split)["top1"] if val_split is not None else None
        result = EpochResult(epoch, train_loss, 100.0 * float(correct) / max(seen, 1), val, lr)
        history.append(result)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val:.2f}" if val is not None else "-")
        if on_epoch is not None:
            on_epoch(result)
    bar.close()
    model.eval()
    return history
