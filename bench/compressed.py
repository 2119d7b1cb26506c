"""One compressed run's body, step by step: compress -> (a final: check the target) -> recalibrate
(BN) -> evaluate -> fine-tune -> measure -> log.

Every method goes through exactly these steps (the harness never branches on a method's name);
:func:`run_body` calls them in order and each step's metrics join the run's. The ``Finetune`` a
method receives while compressing (:class:`_HarnessFinetune`) trains under the study's fine-tuning
recipe on the training split and logs its epochs as ``inner_*`` step metrics of the run. Only a
final run (``spec.stage == "final"``) evaluates on test; a tuning trial never sees test data.
:class:`StepClock` times the steps: every run logs ``time_<step>_s`` for each of :data:`STEPS`
(each second counted in one step only), ``compress_epochs`` and ``wall_time_s``.
A final whose achieved params ratio misses its target fails at once (:class:`TargetMissed`), before
any fine-tuning: its numbers would stand under a target they did not reach.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench import footprint
from bench.deploy import Deployment, Timing, deploy
from bench.deploy.sparse import describe
from bench.runs import Baseline, RunSpec
from bench.tracking import RunHandle
from bench.training import evaluate, recalibrate_bn, train
from methods.base import (
    CalibData,
    CompressionMethod,
    CompressionWarning,
    Target,
    create_method,
    stored_params,
)

if TYPE_CHECKING:  # bench.runner imports this module: annotations only, no import cycle
    from bench.runner import Sweep

__all__ = ["STEPS", "StepClock", "TargetMissed", "run_body", "target_miss"]

# The steps a compressed run's wall time is split into (metrics ``time_<step>_s``): compress (the
# method's own work, its fine-tuning epochs and the finals' target check included), BatchNorm
# re-estimation, evaluation (before and after fine-tuning; the per-epoch validation is part of
# fine-tuning), fine-tuning, the measure step (params, MACs, latency) and logging to MLflow.
STEPS = ("compress", "bn", "eval", "finetune", "latency", "log")


class StepClock:
    """Wall time per step of one run (:data:`STEPS`), each second counted in one step only.

    ``with clock("eval"):`` charges its time to ``eval``; a step timed inside another (the
    fine-tuning's per-epoch logging) pauses the outer one, so the steps add up to at most the
    wall time since the clock was made (the rest: what no step covers, e.g. opening the run).
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.start = self._since = time.perf_counter()
        self._stack: list[str] = []

    @contextlib.contextmanager
    def __call__(self, step: str):
        if step not in self.seconds:
            raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        self._switch()
        self._stack.append(step)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def _switch(self) -> None:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    def metrics(self) -> dict[str, float]:
        """``time_<step>_s`` for every step, and ``wall_time_s`` (seconds since the clock began)."""
        out = {f"time_{step}_s": s for step, s in self.seconds.items()}
        out["wall_time_s"] = time.perf_counter() - self.start
        return out


class TargetMissed(RuntimeError):
    """A final run's achieved params ratio misses its target; the message is one line."""


def target_miss(target: Target, achieved: float) -> str | None:
    """Why ``achieved`` (dense params / stored params) misses ``target``, or None when it meets it.

    A ratio is met within its tolerance on either side (the methods' contract, ``methods.base``:
    2 % by default); per-layer rates set no ratio, and are met when the model is smaller at all.
    """
    if target.ratio is None:
        if achieved > 1.0:
            return None
        return f"layer rates {target.label} compress nothing: params ratio {achieved:.3f}x"
    low, high = target.bounds()
    if low - 1e-9 <= achieved <= high + 1e-9:
        return None
    return (
        f"achieved params ratio {achieved:.3f}x misses the target {target.label}x "
        f"(allowed {low:.3f}x to {high:.3f}x: {target.tolerance:.0%} tolerance)"
    )


class _HarnessFinetune:
    """The ``Finetune`` a method gets: the study's fine-tuning recipe on the training split."""

    def __init__(self, sweep: Sweep, spec: RunSpec, handle: RunHandle | None) -> None:
        self.sweep, self.spec, self.handle = sweep, spec, handle
        self.epochs = 0.0
        self._step = 0

    def __call__(self, model: nn.Module, epochs: float, *, regularizer=None) -> float:
        gen = torch.Generator().manual_seed(self.spec.seed * 1000 + self._step + 1)
        history = train(
            model,
            self.sweep.splits.train,
            self.spec.finetune,
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


def run_body(
    sweep: Sweep, spec: RunSpec, base: Baseline, handle: RunHandle, on_epoch=None
) -> dict[str, float]:
    """Compress the baseline, fine-tune, measure; log it all to ``handle``; return the metrics.

    ``on_epoch`` receives each epoch of the fine-tuning (Optuna reports and prunes through it).
    The steps' wall times (:class:`StepClock`) are logged last, with ``wall_time_s``, and added to
    ``sweep``'s per-method totals (:meth:`bench.runner.Sweep.add_step_times`) however the run
    ends (a pruned trial, a missed target), for the sweep's closing summary.
    """
    clock = StepClock()
    try:
        with clock("compress"):
            method, model, inner = compress(sweep, spec, base, handle)
            if spec.final_stage:
                check_target(sweep, spec, model, handle)
        metrics = {"baseline_val_top1": base.val_top1}
        metrics |= recalibrate(sweep, spec, model, clock)
        with clock("eval"):
            metrics |= evaluate_before_finetuning(sweep, spec, base, model)
        with clock("log"):
            handle.log_metrics(metrics)
        with clock("finetune"):
            finetune(sweep, spec, method, model, handle, on_epoch, clock)
        with clock("eval"):
            metrics |= evaluate_after_finetuning(sweep, spec, model)
        with clock("latency"):
            measured, deployment = measure(sweep, spec, base, model)
            metrics |= measured
        metrics["compress_epochs"] = inner.epochs
        metrics["epochs_total"] = inner.epochs + spec.finetune_epochs
        with clock("log"):
            log(sweep, spec, method, model, handle, metrics, deployment)
        times = clock.metrics()
        handle.log_metrics(times)
    finally:
        sweep.add_step_times(spec.method, clock.seconds)
    return metrics | times


def compress(
    sweep: Sweep, spec: RunSpec, base: Baseline, handle: RunHandle
) -> tuple[CompressionMethod, nn.Module, _HarnessFinetune]:
    """Step 1: the method compresses the baseline, seeded; returns the method, the compressed
    model on the device and the ``Finetune`` it was given (which counts its epochs).

    The method calibrates on training batches only; its :class:`CompressionWarning` messages
    become the run's ``warnings`` tag.
    """
    model = sweep.load_baseline(base)
    torch.manual_seed(spec.seed)
    method = create_method(spec.method, **spec.hps)
    gen = torch.Generator().manual_seed(spec.seed)
    batch_size = spec.finetune.batch_size
    calib = CalibData(
        lambda: sweep.splits.train.batches(batch_size, shuffle=True, augment=True, generator=gen),
        sweep.input_shape,
        sweep.info.num_classes,
        sweep.device,
    )
    inner = _HarnessFinetune(sweep, spec, handle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        compressed = method.compress(model, Target.parse(spec.target), calib, inner)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, CompressionWarning)})
    if notes:
        handle.set_tags({"warnings": " | ".join(notes)[:4900]})
    return method, compressed.to(sweep.device), inner


def check_target(sweep: Sweep, spec: RunSpec, model: nn.Module, handle: RunHandle) -> None:
    """Step 1b, finals only: the achieved params ratio meets the target (:func:`target_miss`),
    whatever chose the hyperparameters (tuning, ``--no-tune``, the fallback to the defaults when no
    trial was feasible). The ratio is logged either way; a miss raises :class:`TargetMissed`,
    and the run ends FAILED with the reason in its ``error`` tag."""
    # the target is on the models as trained (BatchNorm included), not on their deployed forms
    dense, stored = sweep.dense_footprint().stored_params, stored_params(model)
    achieved = dense / stored
    handle.log_metrics({"params_ratio": achieved, "stored_params": stored, "dense_params": dense})
    reason = target_miss(Target.parse(spec.target), achieved)
    if reason is not None:
        raise TargetMissed(reason)


def recalibrate(
    sweep: Sweep, spec: RunSpec, model: nn.Module, clock: StepClock | None = None
) -> dict[str, float]:
    """Step 2: re-estimate every BatchNorm's statistics on training batches (every method alike),
    so that the numbers before fine-tuning measure the compressed weights, not stale statistics.

    Returns ``val_top1_pre_ft`` (validation top-1 after it) and, when any BatchNorm was
    re-estimated, ``val_top1_pre_bn`` (before it). ``clock`` times the evaluations as ``eval``,
    the re-estimation as ``bn``.
    """
    clock = clock or StepClock()
    with clock("eval"):
        before = evaluate(model, sweep.splits.val)["top1"]
    with clock("bn"):
        recalibrated = recalibrate_bn(
            model,
            sweep.splits.train,
            batches=spec.bn_recalibration_batches,
            batch_size=spec.finetune.batch_size,
            generator=torch.Generator().manual_seed(spec.seed + 2),
        )
    if not recalibrated:
        return {"val_top1_pre_ft": before}
    with clock("eval"):
        after = evaluate(model, sweep.splits.val)["top1"]
    return {"val_top1_pre_bn": before, "val_top1_pre_ft": after}


def evaluate_before_finetuning(
    sweep: Sweep, spec: RunSpec, base: Baseline, model: nn.Module
) -> dict[str, float]:
    """Step 3: a final's test top-1 before fine-tuning, beside the baseline's (a trial: none)."""
    if not spec.final_stage:
        return {}
    return {
        "baseline_test_top1": base.test_top1,
        "test_top1_pre_ft": evaluate(model, sweep.splits.test)["top1"],
    }


def finetune(
    sweep: Sweep,
    spec: RunSpec,
    method: CompressionMethod,
    model: nn.Module,
    handle: RunHandle,
    on_epoch=None,
    clock: StepClock | None = None,
) -> None:
    """Step 4: the harness's fine-tuning, ``spec.finetune_epochs`` under the study's recipe, with
    the method's regulariser; each epoch is logged as step metrics (timed as ``log`` by
    ``clock``) and passed to ``on_epoch``."""
    clock = clock or StepClock()

    def log_epoch(result):
        with clock("log"):
            handle.log_metrics(result.metrics(), step=result.epoch)
        if on_epoch is not None:
            on_epoch(result)

    train(
        model,
        sweep.splits.train,
        spec.finetune,
        epochs=spec.finetune_epochs,
        val_split=sweep.splits.val,
        regularizer=method.regularize,
        generator=torch.Generator().manual_seed(spec.seed + 1),
        on_epoch=log_epoch,
        desc=f"{spec.method} {spec.target} s{spec.seed}",
    )


def evaluate_after_finetuning(sweep: Sweep, spec: RunSpec, model: nn.Module) -> dict[str, float]:
    """Step 5a: validation top-1 after fine-tuning; a final's test top-1 (and top-5) too."""
    out = {"val_top1": evaluate(model, sweep.splits.val)["top1"]}
    if spec.final_stage:
        test = evaluate(model, sweep.splits.test, topk=sweep.topk())
        out["test_top1"] = test["top1"]
        if "top5" in test:
            out["test_top5"] = test["top5"]
    return out


def measure(
    sweep: Sweep, spec: RunSpec, base: Baseline, model: nn.Module
) -> tuple[dict[str, float], Deployment]:
    """Step 5b: params, stored params, MACs, MACs nz and bytes of the deployed compressed model
    (each layer in its form measured fastest on the headline latency case, ``bench.deploy``);
    its latency timed interleaved with the trained dense baseline's (now, under the same machine
    state), both deployed, on every latency case of the study (device, backend, batch:
    ``bench.footprint.latency_metrics`` names the metrics); and the ratios. Returns the metrics
    and the headline deployment (its notes go to ``layers.csv``).

    A tuning trial times the headline case only, briefly (a tenth of ``min_run_time``, at most
    0.1 s: enough to rank trials by speedup with ``tuning.objectives: [val_top1, latency]``)."""
    dense = sweep.dense_footprint()
    lat = sweep.study.latency
    trial = not spec.final_stage
    cases = sweep.latency_cases(trial=trial)
    head = cases[0]
    timing = Timing(head.device, head.batch_size, lat.threads)
    deployment = deploy(copy.deepcopy(model).to(head.device), sweep.input_shape, timing)
    fp = footprint.measure(
        model, sweep.input_shape, stored=stored_params(model), latency=False, deployment=deployment
    )
    results = footprint.compare_latencies(
        sweep.load_baseline(base),
        model,
        sweep.input_shape,
        cases,
        threads=lat.threads,
        min_run_time=min(0.1, lat.min_run_time / 10) if trial else 2 * lat.min_run_time,
        deployed={(1, head.device, head.batch_size): deployment.model},
    )
    return {
        "params": fp.params,
        "stored_params": fp.stored_params,
        "macs": fp.macs,
        "macs_nz": fp.macs_nz,
        "model_bytes": fp.model_bytes,
        "dense_params": dense.params,
        "dense_macs": dense.macs,
        "dense_macs_nz": dense.macs_nz,
        "dense_model_bytes": dense.model_bytes,
        "params_ratio": dense.stored_params / fp.stored_params,
        "macs_ratio": dense.macs / fp.macs,
        "macs_nz_ratio": dense.macs / fp.macs_nz,
        "bytes_ratio": dense.model_bytes / fp.model_bytes,
        **footprint.latency_metrics(results),
    }, deployment


def log(
    sweep: Sweep,
    spec: RunSpec,
    method: CompressionMethod,
    model: nn.Module,
    handle: RunHandle,
    metrics: dict[str, float],
    deployment: Deployment | None = None,
) -> None:
    """Step 6: the metrics, the ``deployed`` tag (what was deployed: "structured" or e.g.
    "masked dense: 13 layers; sparse: 2 layers"), the per-layer table (with the deployment's
    per-layer notes), the study and (for a final) the state dict."""
    handle.log_metrics(metrics)
    handle.set_tags(sweep.latency_tags())
    notes = None
    if deployment is not None:
        handle.set_tags({"deployed": describe(deployment.model)})
        notes = deployment.notes
    rows = footprint.layer_table(copy.deepcopy(model).cpu(), sweep.input_shape, method, notes)
    handle.log_rows(rows, "layers.csv")
    handle.log_text(sweep.study.to_yaml(), "study.yaml")
    if spec.final_stage:
        handle.log_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
