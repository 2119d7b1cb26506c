"""Runs as values: what a run is (a spec that owns its key, tags and params) and what it measured.

A run is found again by its ``run_key``, a hash of everything its result depends on
(``docs/design.md`` "One sweep, start to end", point 5): a rerun skips the keys that finished. The
kinds of run and what each key holds:

- baseline (:class:`BaselineSpec`): model, width, dataset, data settings, training recipe, seed;
- tune trial and final (:meth:`RunSpec.trial`, :meth:`RunSpec.final`): the baseline's key, method,
  target, hyperparameters, seed and what the harness does after compressing (fine-tuning recipe,
  BatchNorm re-estimation); a trial also its Optuna study and trial number;
- parent of a (method, ratio) (:meth:`RunSpec.parent`): as a final with seed -1 (it stands for
  every seed), the method's fixed hyperparameters, the tuning config and the seeds.

Every key also holds the code the result depends on (``bench.code_version``, :func:`code_key`):
compressed runs the method's code fingerprint, all runs the harness version once it is bumped
past 1. Every run is tagged ``code_version`` beside ``git_sha``.

Keys of recorded runs must not change by accident (``tests/test_run_keys.py`` pins them): a new
setting joins a key only when it is not at its old default (see :func:`after_compression`). They
changed once on purpose, when the method fingerprint joined the compressed keys (issue #12);
baseline keys kept theirs (harness version 1 is the code that recorded them), so no baseline is
retrained for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import code_version as code
from bench.models import canonical_width
from bench.study import PARETO_OBJECTIVES, DataConfig, Recipe, Study, config_hash
from methods.base import Target, get_method_class

__all__ = [
    "PARENT_SEED",
    "Baseline",
    "BaselineSpec",
    "RunResult",
    "RunSpec",
    "after_compression",
    "code_key",
    "method_defaults",
]

PARENT_SEED = -1  # the seed in a parent's key: it stands for all the seeds of its finals


def method_defaults(study: Study, method: str) -> dict[str, Any]:
    """The method's hyperparameter defaults, overridden by the study's ``method_args``."""
    values = get_method_class(method).hyperparameter_defaults()
    values.update(study.method_args.get(method, {}))
    return values


def after_compression(finetune: Recipe, bn_recalibration_batches: int) -> dict[str, Any]:
    """What the harness does to every compressed model (part of run keys and Optuna study
    fingerprints): the fine-tuning recipe and the BatchNorm re-estimation."""
    out: dict[str, Any] = {"finetune": dataclasses.asdict(finetune)}
    if bn_recalibration_batches:  # absent when off: earlier runs keep their keys
        out["bn_recalibration_batches"] = bn_recalibration_batches
    return out


def code_key(method: str | None = None) -> dict[str, Any]:
    """The code a run key depends on: the harness version (absent at 1: the runs recorded before
    it was declared keep their keys) and, for a compressed run (and an Optuna study's
    fingerprint), the method's code fingerprint."""
    out: dict[str, Any] = {}
    if code.HARNESS_VERSION != 1:
        out["harness"] = code.HARNESS_VERSION
    if method is not None:
        out["method_code"] = code.method_fingerprint(method)
    return out


def _prefixed(prefix: str, recipe: Recipe) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(recipe).items()}


def _common_tags(
    stage: str, seed: int, study: str, base: BaselineSpec, sha: str, method: str | None = None
) -> dict:
    """The tags of every run (``bench.tracking``'s schema)."""
    return {
        "study": study,
        "stage": stage,
        "model": base.model,
        "dataset": base.dataset,
        "seed": seed,
        "git_sha": sha,
        "code_version": code.code_version(method),
    }


@dataclass(frozen=True)
class BaselineSpec:
    """A dense model trained once per (model, width, dataset, data, recipe, seed).

    Attributes:
        width: the channel multiplier, None for the model's own (``width: 1.0`` is None too:
            one model, one key, one checkpoint).
    """

    model: str
    dataset: str
    width: float | None
    data: DataConfig
    recipe: Recipe
    seed: int

    @classmethod
    def of(cls, study: Study, seed: int) -> BaselineSpec:
        """The baseline of ``study`` for ``seed``."""
        width = canonical_width(study.width)
        return cls(study.model, study.dataset, width, study.data, study.baseline, seed)

    @property
    def key(self) -> str:
        """The ``run_key`` of the baseline run; also names the checkpoint."""
        return config_hash(
            {
                "stage": "baseline",
                "model": self.model,
                "width": self.width,
                "dataset": self.dataset,
                "data": dataclasses.asdict(self.data),
                "recipe": dataclasses.asdict(self.recipe),
                "seed": self.seed,
                **code_key(),
            }
        )

    @property
    def name(self) -> str:
        """The MLflow run name."""
        return f"baseline-s{self.seed}"

    @property
    def checkpoint_name(self) -> str:
        """``<model>[-w<width>]-<dataset>-s<seed>-<key>.pt``."""
        width = f"-w{self.width:g}" if self.width else ""
        return f"{self.model}{width}-{self.dataset}-s{self.seed}-{self.key}.pt"

    def tags(self, study: str, git_sha: str, *, cached: bool) -> dict[str, Any]:
        """Tags of the baseline run; ``cached``: its checkpoint existed (nothing trained)."""
        common = _common_tags("baseline", self.seed, study, self, git_sha)
        return {**common, "run_key": self.key, "cached": str(cached).lower()}

    def params(self) -> dict[str, Any]:
        """Params of the baseline run: the training recipe and the width."""
        return {**_prefixed("baseline", self.recipe), "width": self.width}


@dataclass(frozen=True)
class RunSpec:
    """One compressed run (a tuning trial or a final) or the parent of a (method, ratio).

    Built with :meth:`final`, :meth:`trial` or :meth:`parent`; ``key`` is its ``run_key``.

    Attributes:
        stage: "tune", "final" or "parent".
        target: the compression target's label (``Target.parse(ratio).label``: "2", "[0.5]*3").
        seed: the run's seed (the baseline's too); :data:`PARENT_SEED` for a parent.
        hps: the method's hyperparameters.
        baseline: the dense model it compresses.
        finetune: the fine-tuning recipe (the study's ``finetune``).
        bn_recalibration_batches: BatchNorm re-estimation after compressing (0: off).
        epochs: fine-tuning epochs of this run (None: the recipe's); not in the key.
        key_extra: more key fields (trial number and Optuna study; tuning config and seeds).
        extra_tags: tags besides the common ones (not in the key).
    """

    stage: str
    method: str
    target: str
    seed: int
    hps: Mapping[str, Any]
    baseline: BaselineSpec
    finetune: Recipe
    bn_recalibration_batches: int
    epochs: float | None = None
    key_extra: Mapping[str, Any] = field(default_factory=dict)
    extra_tags: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------- constructors
    @classmethod
    def _of(cls, study: Study, stage: str, method: str, target, seed: int, hps, **more):
        return cls(
            stage,
            method,
            Target.parse(target).label,
            seed,
            dict(hps),
            BaselineSpec.of(study, seed),
            study.finetune,
            study.bn_recalibration_batches,
            **more,
        )

    @classmethod
    def final(cls, study: Study, method: str, target, seed: int, hps, extra_tags=None) -> RunSpec:
        """A final run: evaluated on test, its compressed state dict kept."""
        return cls._of(study, "final", method, target, seed, hps, extra_tags=extra_tags or {})

    @classmethod
    def trial(
        cls, study: Study, method: str, target, hps, *, number: int, optuna_study: str
    ) -> RunSpec:
        """Tuning trial ``number`` of ``optuna_study``: on the first seed, for ``tuning.epochs``,
        never on test."""
        coords = {"trial": number, "optuna_study": optuna_study}
        return cls._of(
            study,
            "tune",
            method,
            target,
            study.seeds[0],
            hps,
            epochs=study.tuning.epochs,
            key_extra=coords,
            extra_tags={"trial_number": number, "optuna_study": optuna_study},
        )

    @classmethod
    def parent(cls, study: Study, method: str, target) -> RunSpec:
        """The parent of a (method, ratio): it stands for everything its finals depend on, the
        method's fixed hyperparameters (defaults + ``method_args``) and, when tuning, the tuning
        config; a changed ``method_args`` or ``--no-tune`` is a new parent, never a stale summary
        of the old one."""
        tuning = dataclasses.asdict(study.tuning) if study.tuning.trials > 0 else None
        if tuning and tuning["objectives"] == PARETO_OBJECTIVES[:2]:
            del tuning["objectives"]  # the default: parents keyed before it existed stay theirs
        return cls._of(
            study,
            "parent",
            method,
            target,
            PARENT_SEED,
            method_defaults(study, method),
            key_extra={"tuning": tuning, "seeds": list(study.seeds)},
            extra_tags={"seed": study.seeds[0]},  # the seed tag names the first seed
        )

    # -------------------------------------------------------------------------------- values
    @property
    def key(self) -> str:
        """The ``run_key``: a hash of everything the run's result depends on."""
        return config_hash(
            {
                "stage": self.stage,
                "baseline": self.baseline.key,
                "method": self.method,
                "ratio": self.target,
                "hps": dict(self.hps),
                "seed": self.seed,
                **after_compression(self.finetune, self.bn_recalibration_batches),
                **code_key(self.method),
                **self.key_extra,
            }
        )

    @property
    def final_stage(self) -> bool:
        """A final run: the only kind evaluated on test."""
        return self.stage == "final"

    @property
    def finetune_epochs(self) -> float:
        """Epochs of the harness's fine-tuning after compression."""
        return self.finetune.epochs if self.epochs is None else self.epochs

    @property
    def name(self) -> str:
        """The MLflow run name."""
        if self.stage == "parent":
            return f"{self.method}-{self.target}"
        return f"{self.method}-{self.target}-{self.stage}-s{self.seed}"

    def tags(self, study: str, git_sha: str) -> dict[str, Any]:
        """Tags of the run: the common ones, the method's and ``extra_tags``."""
        cls = get_method_class(self.method)
        return {
            **_common_tags(self.stage, self.seed, study, self.baseline, git_sha, self.method),
            "run_key": self.key,
            "method": self.method,
            "family": cls.family,
            "structured": str(cls.structured).lower(),
            "ratio": self.target,
            **self.extra_tags,
        }

    def params(self) -> dict[str, Any]:
        """Params of a compressed run: hyperparameters, both recipes, target, BN batches."""
        return {
            **{f"hp.{k}": v for k, v in self.hps.items()},
            **_prefixed("finetune", self.finetune),
            **_prefixed("baseline", self.baseline.recipe),
            "target_ratio": self.target,
            "bn_recalibration_batches": self.bn_recalibration_batches,
        }

    def result(self, metrics: Mapping[str, float], *, skipped: bool = False) -> RunResult:
        """What this run measured."""
        s = self
        return RunResult(s.method, s.target, s.seed, s.stage, dict(metrics), s.key, skipped)


@dataclass(frozen=True)
class Baseline:
    """A trained dense model's checkpoint and its measured accuracies (percent)."""

    key: str
    path: Path
    val_top1: float
    test_top1: float
    test_top5: float | None

    @classmethod
    def measured(cls, key: str, path: Path, metrics: Mapping[str, float]) -> Baseline:
        """From the metrics the baseline run logged (or its checkpoint holds)."""
        return cls(key, path, metrics["val_top1"], metrics["test_top1"], metrics.get("test_top5"))


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

    @classmethod
    def recorded(cls, run, *, skipped: bool = True) -> RunResult:
        """From a finished MLflow run (its tags and metrics)."""
        tags = run.data.tags
        return cls(
            tags["method"],
            tags["ratio"],
            int(tags.get("seed", 0)),
            tags["stage"],
            dict(run.data.metrics),
            tags.get("run_key", ""),
            skipped,
        )
