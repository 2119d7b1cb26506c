"""The sweep engine: baselines, compressed runs and their measurements, all keyed and resumable.

It never branches on which method it runs: every method goes through the same ``compress`` ->
measure -> fine-tune -> measure path (DESIGN.md "One sweep, start to end"). Tuning lives in
``bench.tuning`` and calls :meth:`Sweep.compressed_run` for each trial.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import footprint
from bench.data import load_splits
from bench.models import create_model
from bench.paths import results_dir
from bench.study import Recipe, Study, config_hash
from bench.tracking import RunHandle, Tracker, git_sha
from bench.training import evaluate, train
from methods.base import Target, get_method_class

__all__ = ["Baseline", "RunResult", "Sweep", "resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """ "auto" (or None) = CUDA when available, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Baseline:
    """A trained dense model's checkpoint and its measured accuracies (percent)."""

    key: str
    path: Path
    val_top1: float
    test_top1: float
    test_top5: float | None


@dataclass(frozen=True)
class RunResult:
    """What one compressed run measured (also rebuilt from MLflow for finished runs)."""

    method: str
    ratio: str
    seed: int
    stage: str
    metrics: dict[str, float]
    run_key: str
    skipped: bool = False


class Sweep:
    """One study on one device with its stores; built after validation (``bench.validate``)."""

    def __init__(
        self,
        study: Study,
        tracker: Tracker,
        *,
        data_root: Path | None = None,
        download: bool = False,
        device: torch.device | None = None,
        say=print,
    ) -> None:
        self.study = study
        self.tracker = tracker
        self.data_root = data_root
        self.download = download
        self.device = device or resolve_device(None)
        self.say = say
        self.sha = git_sha()
        self._splits = None
        self._dense_fp: dict[str, footprint.Footprint] = {}
        self.finetune_recipe: Recipe = study.finetune

    # ---------------------------------------------------------------------------------- data
    @property
    def splits(self):
        if self._splits is None:
            d = self.study.data
            t0 = time.perf_counter()
            self._splits = load_splits(
                self.study.dataset,
                self.data_root,
                download=self.download,
                device=self.device,
                val_size=d.val_size,
                split_seed=d.split_seed,
                train_subset=d.train_subset,
                test_subset=d.test_subset,
            )
            self.say(
                f"data: {self.study.dataset} train {len(self._splits.train)} / val "
                f"{len(self._splits.val)} / test {len(self._splits.test)} images on {self.device} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        return self._splits

    @property
    def info(self):
        from bench.data import dataset_info

        return dataset_info(self.study.dataset)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        i = self.info
        return (i.in_chans, i.height, i.width)

    def new_model(self) -> nn.Module:
        return create_model(
            self.study.model,
            num_classes=self.info.num_classes,
            in_chans=self.info.in_chans,
            width=self.study.width,
        )

    def base_tags(self, stage: str, seed: int) -> dict[str, Any]:
        s = self.study
        return {
            "study": s.name,
            "stage": stage,
            "model": s.model,
            "dataset": s.dataset,
            "seed": seed,
            "git_sha": self.sha,
        }

    def topk(self) -> tuple[int, ...]:
        return (1, 5) if self.info.num_classes > 10 else (1,)

    # ----------------------------------------------------------------------------- baselines
    def baseline_config(self, seed: int) -> dict[str, Any]:
        s = self.study
        return {
            "stage": "baseline",
            "model": s.model,
            "width": s.width,
            "dataset": s.dataset,
            "data": dataclasses.asdict(s.data),
            "recipe": dataclasses.asdict(s.baseline),
            "seed": seed,
        }

    def baseline_key(self, seed: int) -> str:
        return config_hash(self.baseline_config(seed))

    def checkpoint_path(self, seed: int) -> Path:
        s = self.study
        width = f"-w{s.width:g}" if s.width else ""
        name = f"{s.model}{width}-{s.dataset}-s{seed}-{self.baseline_key(seed)}.pt"
        return results_dir() / "checkpoints" / name

    def baseline(self, seed: int) -> Baseline:
        """The trained dense model for ``seed``: from the checkpoint cache, else trained now.

        Either way the study gets a FINISHED baseline run in MLflow (tag ``cached`` says which).
        """
        key, path = self.baseline_key(seed), self.checkpoint_path(seed)
        cached = path.exists()
        if cached:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        done = self.tracker.finished(key)
        if cached and done is not None:
            return self._baseline_from(key, path, ckpt["metrics"])
        tags = {**self.base_tags("baseline", seed), "run_key": key, "cached": str(cached).lower()}
        params = {f"baseline.{k}": v for k, v in dataclasses.asdict(self.study.baseline).items()}
        params["width"] = self.study.width
        with self.tracker.run(f"baseline-s{seed}", tags, params) as handle:
            if cached:
                metrics = ckpt["metrics"]
                self.say(f"baseline seed {seed}: reusing {path.name}")
            else:
                metrics = self._train_baseline(seed, handle, path)
            fp = self.dense_footprint()
            handle.log_metrics(
                {**metrics, "params": fp.params, "macs": fp.macs, "latency_ms": fp.latency_ms}
            )
            handle.log_text(self.study.to_yaml(), "study.yaml")
        return self._baseline_from(key, path, metrics)

    @staticmethod
    def _baseline_from(key: str, path: Path, metrics: dict) -> Baseline:
        return Baseline(
            key, path, metrics["val_top1"], metrics["test_top1"], metrics.get("test_top5")
        )

    def _train_baseline(self, seed: int, handle: RunHandle, path: Path) -> dict[str, float]:
        torch.manual_seed(seed)
        model = self.new_model().to(self.device)
        t0 = time.perf_counter()
        self.say(
            f"baseline seed {seed}: training {self.study.model} for "
            f"{self.study.baseline.epochs:g} epochs"
        )
        train(
            model,
            self.splits.train,
            self.study.baseline,
            val_split=self.splits.val,
            generator=torch.Generator().manual_seed(seed),
            desc=f"baseline s{seed}",
            on_epoch=lambda r: handle.log_metrics(r.metrics(), step=r.epoch),
        )
        test = evaluate(model, self.splits.test, topk=self.topk())
        metrics = {
            "val_top1": evaluate(model, self.splits.val)["top1"],
            "test_top1": test["top1"],
            "wall_time_s": time.perf_counter() - t0,
        }
        if "top5" in test:
            metrics["test_top5"] = test["top5"]
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _atomic_save({"state_dict": state, "metrics": metrics}, path)
        self.say(
            f"baseline seed {seed}: val {metrics['val_top1']:.2f}% test "
            f"{metrics['test_top1']:.2f}% in {metrics['wall_time_s']:.0f} s"
        )
        return metrics

    def load_baseline(self, base: Baseline) -> nn.Module:
        model = self.new_model()
        ckpt = torch.load(base.path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        return model.to(self.device).eval()

    def dense_footprint(self) -> footprint.Footprint:
        """Params, MACs and latency of the dense model (measured once per process, on CPU)."""
        if "dense" not in self._dense_fp:
            self._dense_fp["dense"] = self._measure(self.new_model(), None)
        return self._dense_fp["dense"]

    def _measure(
        self, model: nn.Module, stored: int | None, latency: bool = True
    ) -> footprint.Footprint:
        lat = self.study.latency
        model = copy.deepcopy(model).cpu().eval()
        return footprint.measure(
            model,
            self.input_shape,
            stored=stored,
            latency=latency,
            batch_size=lat.batch_size,
            threads=lat.threads,
            min_run_time=lat.min_run_time,
        )

    # ------------------------------------------------------------------------------ compress
    def method_defaults(self, method: str) -> dict[str, Any]:
        """The method's defaults, overridden by the study's ``method_args``."""
        values = get_method_class(method).hyperparameter_defaults()
        values.update(self.study.method_args.get(method, {}))
        return values

    def compressed_key(
        self,
        stage: str,
        method: str,
        ratio: str,
        seed: int,
        hps: dict[str, Any],
        extra: dict | None = None,
    ) -> str:
        return config_hash(
            {
                "stage": stage,
                "baseline": self.baseline_key(seed),
                "method": method,
                "ratio": ratio,
                "hps": hps,
                "seed": seed,
                **self.after_compression(),
                **(extra or {}),
            }
        )

    def after_compression(self) -> dict[str, Any]:
        """What the harness does to every compressed model (part of run keys and Optuna study
        fingerprints): the fine-tuning recipe and the BatchNorm re-estimation."""
        out: dict[str, Any] = {"finetune": dataclasses.asdict(self.finetune_recipe)}
        if self.study.bn_recalibration_batches:  # absent when off: earlier runs keep their keys
            out["bn_recalibration_batches"] = self.study.bn_recalibration_batches
        return out

    def compressed_run(
        self,
        *,
        stage: str,
        method: str,
        ratio: float | str,
        seed: int,
        hps: dict[str, Any],
        parent: RunHandle | None = None,
        run_key: str | None = None,
        extra_tags: dict[str, Any] | None = None,
        on_epoch=None,
        epochs: float | None = None,
    ) -> RunResult:
        """Compress the baseline of ``seed`` with ``method``, fine-tune, measure and log.

        ``stage="final"`` also evaluates on test; ``stage="tune"`` never touches test data.
        ``on_epoch`` receives each fine-tuning epoch (Optuna reports and prunes through it).
        """
        label = Target.parse(ratio).label
        key = run_key or self.compressed_key(stage, method, label, seed, hps)
        done = self.tracker.finished(key)
        if done is not None:
            return RunResult(method, label, seed, stage, dict(done.data.metrics), key, skipped=True)
        base = self.baseline(seed)
        cls = get_method_class(method)
        tags = {
            **self.base_tags(stage, seed),
            "run_key": key,
            "method": method,
            "family": cls.family,
            "structured": str(cls.structured).lower(),
            "ratio": label,
            **(extra_tags or {}),
        }
        params = {f"hp.{k}": v for k, v in hps.items()}
        params.update(
            {f"finetune.{k}": v for k, v in dataclasses.asdict(self.finetune_recipe).items()}
        )
        params.update(
            {f"baseline.{k}": v for k, v in dataclasses.asdict(self.study.baseline).items()}
        )
        params["target_ratio"] = label
        params["bn_recalibration_batches"] = self.study.bn_recalibration_batches
        with self.tracker.run(f"{method}-{label}-{stage}-s{seed}", tags, params, parent) as handle:
            metrics = self._compress_finetune(
                stage, method, label, seed, hps, base, handle, on_epoch, epochs
            )
        return RunResult(method, label, seed, stage, metrics, key)

    def _compress_finetune(self, stage, method, label, seed, hps, base, handle, on_epoch, epochs):
        from bench.compressed import compress_finetune_measure

        return compress_finetune_measure(
            self, stage, method, label, seed, hps, base, handle, on_epoch, epochs
        )


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
