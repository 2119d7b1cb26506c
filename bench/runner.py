"""The sweep engine: one study on one device with its stores; baselines and compressed runs.

:class:`Sweep` holds what every run of a study shares (data splits, the dense model, footprint
measurements, the tracking store) and runs one :class:`bench.runs.RunSpec` at a time. It never
branches on which method it runs: every method goes through the same steps
(:func:`bench.compressed.run_body`; ``docs/design.md`` "One sweep, start to end"). Tuning lives in
``bench.tuning`` and calls :meth:`Sweep.compressed_run` for each trial; the order of runs, the plan
and the CLI live in ``bench.sweep``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import code_version, footprint
from bench.compressed import run_body
from bench.data import Splits, load_splits
from bench.dataset_info import DatasetInfo, dataset_info
from bench.models import create_model
from bench.paths import atomic_path, results_dir
from bench.runs import Baseline, BaselineSpec, RunResult, RunSpec
from bench.stores import remove_leftovers
from bench.study import Study
from bench.tracking import RunHandle, Tracker, git_sha
from bench.training import evaluate, train

__all__ = ["Sweep", "resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """ "auto" (or None) = CUDA when available, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Sweep:
    """One study on one device with its stores; built after validation
    (:func:`bench.sweep.validate_study`)."""

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
        for method in study.methods:  # fixed now: an edit during the sweep does not relabel
            code_version.method_fingerprint(method)
        self._splits: Splits | None = None
        self._dense_fp: footprint.Footprint | None = None
        # where this process's time went, for the closing summary (bench.sweep.time_table):
        # seconds per method and step of the compressed runs run now (trials and finals), of
        # each (method, ratio) pair as a whole, and of training the baselines
        self.step_seconds: dict[str, dict[str, float]] = {}
        self.method_seconds: dict[str, float] = {}
        self.baseline_seconds: dict[int, float] = {}

    # ---------------------------------------------------------------------- data and models
    @property
    def splits(self) -> Splits:
        """The study's train, val and test splits on the device, loaded on first use."""
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
    def info(self) -> DatasetInfo:
        return dataset_info(self.study.dataset)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    def new_model(self) -> nn.Module:
        """A freshly initialised dense model of the study."""
        return create_model(
            self.study.model,
            num_classes=self.info.num_classes,
            in_chans=self.info.in_chans,
            width=self.study.width,
        )

    @property
    def latency_device(self) -> str:
        """Where latency is timed: ``latency.device``, else the training device."""
        return self.study.latency.device or str(self.device)

    def latency_cases(self, trial: bool = False) -> list[footprint.LatencyCase]:
        """The study's latency cases, the headline first; a tuning trial's: the headline only."""
        lat = self.study.latency
        cases = footprint.latency_cases(self.latency_device, lat.batch_sizes, lat.backends)
        return cases[:1] if trial else cases

    def latency_tags(self) -> dict[str, str]:
        """What the headline ``latency_ms`` and ``speedup`` were measured on (reports say it)."""
        head, lat = self.latency_cases()[0], self.study.latency
        return {
            "latency_device": head.device,
            "latency_backend": head.backend,
            "latency_batch": str(head.batch_size),
            "latency_threads": str(lat.threads),
            "latency_cases": ",".join(c.key for c in self.latency_cases()),
        }

    def topk(self) -> tuple[int, ...]:
        """Top-k accuracies measured on test: top-5 too where there are more than 10 classes."""
        return (1, 5) if self.info.num_classes > 10 else (1,)

    def measure(
        self, model: nn.Module, stored: int | None, latency: bool = True
    ) -> footprint.Footprint:
        """Params, MACs (and latency: the headline case) of a copy of ``model``, under the
        study's settings."""
        lat, head = self.study.latency, self.latency_cases()[0]
        model = copy.deepcopy(model).cpu().eval()
        return footprint.measure(
            model,
            self.input_shape,
            stored=stored,
            latency=latency,
            batch_size=head.batch_size,
            device=head.device,
            backend=head.backend,
            threads=lat.threads,
            min_run_time=lat.min_run_time,
        )

    def dense_footprint(self) -> footprint.Footprint:
        """Params, MACs and headline latency of the dense model (measured once per process)."""
        if self._dense_fp is None:
            self._dense_fp = self.measure(self.new_model(), None)
        return self._dense_fp

    def add_step_times(self, method: str, seconds: dict[str, float]) -> None:
        """Add one run's seconds per step (``bench.compressed.StepClock``) to ``method``'s."""
        totals = self.step_seconds.setdefault(method, {})
        for step, s in seconds.items():
            totals[step] = totals.get(step, 0.0) + s
        totals["runs"] = totals.get("runs", 0) + 1

    # ----------------------------------------------------------------------------- baselines
    def checkpoint_path(self, seed: int) -> Path:
        """Where the baseline of ``seed`` is cached (shared by every study with its key)."""
        return results_dir() / "checkpoints" / BaselineSpec.of(self.study, seed).checkpoint_name

    def baseline(self, seed: int) -> Baseline:
        """The trained dense model for ``seed``: from the checkpoint cache, else trained now.

        Either way the study gets a FINISHED baseline run in MLflow (tag ``cached`` says which).
        """
        spec = BaselineSpec.of(self.study, seed)
        path = self.checkpoint_path(seed)
        remove_leftovers(path, "tmp")
        cached = path.exists()
        if cached:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        done = self.tracker.finished(spec.key)
        if cached and done is not None:
            return Baseline.measured(spec.key, path, ckpt["metrics"])
        tags = spec.tags(self.study.name, self.sha, cached=cached)
        with self.tracker.run(spec.name, tags, spec.params()) as handle:
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
        return Baseline.measured(spec.key, path, metrics)

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
        self.baseline_seconds[seed] = metrics["wall_time_s"]
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

    # ------------------------------------------------------------------------ compressed runs
    def compressed_run(
        self, spec: RunSpec, *, parent: RunHandle | None = None, on_epoch=None, force=False
    ) -> RunResult:
        """Run ``spec`` (a trial or a final) unless a run of its key finished (or ``force``: run
        it again, the old run kept), as an MLflow run under ``parent``: the baseline of its seed,
        compressed, fine-tuned, measured, logged.

        ``on_epoch`` receives each fine-tuning epoch (Optuna reports and prunes through it).
        """
        done = None if force else self.tracker.finished(spec.key)
        if done is not None:
            return spec.result(done.data.metrics, skipped=True)
        base = self.baseline(spec.seed)
        tags = spec.tags(self.study.name, self.sha)
        with self.tracker.run(spec.name, tags, spec.params(), parent) as handle:
            metrics = run_body(self, spec, base, handle, on_epoch)
        return spec.result(metrics)


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, synced, then ``os.replace``: never half
    a file. Written through a Python file so that a full disk raises ``OSError(ENOSPC)`` (torch's
    own writer says only "unexpected pos")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, "tmp")  # a killed process's temp file (it names its pid)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
