"""One compressed run's body: compress the baseline, fine-tune it, measure it, log it.

Every method goes through exactly this path (the harness never branches on a method's name). The
``Finetune`` a method receives (:class:`_HarnessFinetune`) trains under the study's fine-tuning
recipe on the training split and logs its epochs as ``inner_*`` step metrics of the run.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from bench import footprint
from bench.tracking import RunHandle
from bench.training import evaluate, recalibrate_bn, train
from methods.base import CalibData, CompressionWarning, Target, create_method, stored_params

__all__ = ["compress_finetune_measure"]


class _HarnessFinetune:
    """The ``Finetune`` a method gets: the study's fine-tuning recipe on the training split."""

    def __init__(self, sweep, handle: RunHandle | None, seed: int) -> None:
        self.sweep, self.handle, self.seed = sweep, handle, seed
        self.epochs = 0.0
        self._step = 0

    def __call__(self, model: nn.Module, epochs: float, *, regularizer=None) -> float:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self._step + 1)
        history = train(
            model,
            self.sweep.splits.train,
            self.sweep.finetune_recipe,
            epochs=epochs,
            val_split=self.sweep.splits.val,
            regularizer=regularizer,
            generator=gen,
            desc="method fine-tune",
        )
        self.epochs += epochs
        for result in history:
            self._step += 1
            self.log(
                {"inner_val_top1": result.val_top1, "inner_train_loss": result.train_loss},
                self._step,
            )
        if history:
            return history[-1].val_top1
        return evaluate(model, self.sweep.splits.val)["top1"]

    def log(self, metrics, step: int) -> None:
        if self.handle is not None:
            self.handle.log_metrics(dict(metrics), step=step)


def compress_finetune_measure(
    sweep, stage, method, label, seed, hps, base, handle, on_epoch, epochs
) -> dict[str, float]:
    """Compress the baseline, fine-tune, measure; log it all to ``handle``; return the metrics.

    ``stage="final"`` also evaluates on test and saves the state dict; ``"tune"`` never sees test.
    """
    t0 = time.perf_counter()
    final = stage == "final"
    dense_fp = sweep.dense_footprint()
    model = sweep.load_baseline(base)
    torch.manual_seed(seed)
    compressor = create_method(method, **hps)
    gen = torch.Generator().manual_seed(seed)
    recipe = sweep.finetune_recipe
    calib = CalibData(
        lambda: sweep.splits.train.batches(
            recipe.batch_size, shuffle=True, augment=True, generator=gen
        ),
        sweep.input_shape,
        sweep.info.num_classes,
        sweep.device,
    )
    inner = _HarnessFinetune(sweep, handle, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        compressed = compressor.compress(model, Target.parse(label), calib, inner)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, CompressionWarning)})
    if notes:
        handle.set_tags({"warnings": " | ".join(notes)[:4900]})
    compressed = compressed.to(sweep.device)
    m: dict[str, float] = {"baseline_val_top1": base.val_top1}
    m["val_top1_pre_ft"] = evaluate(compressed, sweep.splits.val)["top1"]
    # the pre-fine-tuning numbers then measure the compressed weights, not stale statistics
    if recalibrate_bn(
        compressed,
        sweep.splits.train,
        batches=sweep.study.bn_recalibration_batches,
        batch_size=recipe.batch_size,
        generator=torch.Generator().manual_seed(seed + 2),
    ):
        m["val_top1_pre_bn"] = m["val_top1_pre_ft"]
        m["val_top1_pre_ft"] = evaluate(compressed, sweep.splits.val)["top1"]
    if final:
        m["baseline_test_top1"] = base.test_top1
        m["test_top1_pre_ft"] = evaluate(compressed, sweep.splits.test)["top1"]
    handle.log_metrics(m)

    def log_epoch(result):
        handle.log_metrics(result.metrics(), step=result.epoch)
        if on_epoch is not None:
            on_epoch(result)

    ft_epochs = recipe.epochs if epochs is None else epochs
    train(
        compressed,
        sweep.splits.train,
        recipe,
        epochs=ft_epochs,
        val_split=sweep.splits.val,
        regularizer=compressor.regularize,
        generator=torch.Generator().manual_seed(seed + 1),
        on_epoch=log_epoch,
        desc=f"{method} {label} s{seed}",
    )
    m["val_top1"] = evaluate(compressed, sweep.splits.val)["top1"]
    if final:
        test = evaluate(compressed, sweep.splits.test, topk=sweep.topk())
        m["test_top1"] = test["top1"]
        if "top5" in test:
            m["test_top5"] = test["top5"]
    fp = sweep._measure(compressed, stored_params(compressed), latency=False)
    lat = sweep.study.latency
    # the dense and compressed models timed interleaved, now, under the same machine state
    dense_ms, compressed_ms = footprint.compare_latency(
        sweep.new_model(),
        copy.deepcopy(compressed).cpu(),
        sweep.input_shape,
        batch_size=lat.batch_size,
        threads=lat.threads,
        min_run_time=2 * lat.min_run_time,
    )
    m.update(
        {
            "params": fp.params,
            "stored_params": fp.stored_params,
            "macs": fp.macs,
            "latency_ms": compressed_ms,
            "dense_params": dense_fp.params,
            "dense_macs": dense_fp.macs,
            "dense_latency_ms": dense_ms,
            "params_ratio": dense_fp.params / fp.stored_params,
            "macs_ratio": dense_fp.macs / fp.macs,
            "speedup": dense_ms / compressed_ms,
            "epochs_total": inner.epochs + ft_epochs,
            "wall_time_s": time.perf_counter() - t0,
        }
    )
    handle.log_metrics(m)
    rows = footprint.layer_table(copy.deepcopy(compressed).cpu(), sweep.input_shape, compressor)
    handle.log_rows(rows, "layers.csv")
    handle.log_text(sweep.study.to_yaml(), "study.yaml")
    if final:
        handle.log_state_dict({k: v.detach().cpu() for k, v in compressed.state_dict().items()})
    return m
