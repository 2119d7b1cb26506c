"""Studies: ``sweeps/<name>.yaml`` loaded into frozen dataclasses, validated before anything runs.

A study names one model and dataset, the methods and compression targets to sweep, the seeds of the
final runs, and the training recipes. Unknown keys, unknown names and bad values raise
:class:`StudyError` with one line naming the file, the key and the fix. ``--set key=value``
overrides are parsed as YAML scalars and type-checked against the field they replace.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from bench.dataset_info import DataError, dataset_info, split_sizes
from bench.samplers import PRUNERS, SAMPLERS
from methods._targets import MethodConfigError, Target

__all__ = [
    "LATENCY_BACKENDS",
    "DataConfig",
    "LatencyConfig",
    "Recipe",
    "Study",
    "StudyError",
    "TuningConfig",
    "check_data",
    "config_hash",
    "find_study",
    "list_studies",
    "load_study",
]

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"


class StudyError(ValueError):
    """A study file or override that cannot run; the message is one line."""


LATENCY_BACKENDS = ("torch", "onnxruntime")  # bench.footprint.BACKENDS (no torch import here)
PARETO_OBJECTIVES = ("val_top1", "macs", "latency")  # tuning.objectives: accuracy and one cost
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Recipe:
    """One SGD training recipe (baseline training or fine-tuning).

    Attributes:
        epochs: passes over the training split (fractions allowed: 0.5 = half an epoch).
        lr: peak learning rate for ``batch_size`` examples per step.
        batch_size: examples per step.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 coefficient on every parameter.
        schedule: "cosine" (to zero over the run), "step" (x0.1 at 1/3 and 2/3, DCTPruning's
            fine-tuning recipe) or "constant".
        label_smoothing: cross-entropy label smoothing.
    """

    epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise StudyError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.batch_size < 1:
            raise StudyError(
                f"lr must be > 0 and batch_size >= 1 (got {self.lr}, {self.batch_size})"
            )
        if self.schedule not in ("cosine", "step", "constant"):
            raise StudyError(f"schedule {self.schedule!r} must be cosine, step or constant")


@dataclass(frozen=True)
class TuningConfig:
    """Optuna tuning of each (method, ratio) on the validation split.

    Attributes:
        trials: COMPLETE trials per (method, ratio); 0 runs the defaults only.
        sampler: "tpe" or "random" (seeded by ``seed``; ``bench.samplers.SAMPLERS``).
        metric: what a trial maximises: "val_acc" (validation top-1).
        mode: "single" (best validation accuracy subject to the params ratio) or "pareto"
            (validation accuracy vs ``objectives[1]``, NSGA-II; every Pareto point gets final
            runs).
        objectives: the Pareto mode's two objectives: ``val_top1`` (maximised) and ``macs``
            (the compressed model's MACs, minimised) or ``latency`` (its measured speedup over
            the dense baseline, timed interleaved with it, briefly, on the study's headline
            latency setting, maximised).
        pruner: "median" (stop trials below the median per-epoch validation accuracy) or "none"
            (``bench.samplers.PRUNERS``).
        epochs: fine-tuning epochs of a trial (None: the study's ``finetune.epochs``).
        seed: sampler seed.
        defaults_first: the first trial of a new Optuna study runs the method's defaults
            (``enqueue_trial``), so tuning never ends below them on validation.
    """

    trials: int = 0
    sampler: str = "tpe"
    metric: str = "val_acc"
    mode: str = "single"
    pruner: str = "median"
    epochs: float | None = None
    seed: int = 0
    defaults_first: bool = True
    objectives: tuple[str, ...] = PARETO_OBJECTIVES[:2]

    def __post_init__(self) -> None:
        if (
            len(self.objectives) != 2
            or self.objectives[0] != "val_top1"
            or self.objectives[1] not in PARETO_OBJECTIVES[1:]
        ):
            raise StudyError(
                f"tuning.objectives {list(self.objectives)} must be [val_top1, macs] or "
                "[val_top1, latency]"
            )
        if self.mode != "pareto" and self.objectives != PARETO_OBJECTIVES[:2]:
            raise StudyError(
                f"tuning.objectives {list(self.objectives)} need tuning.mode: pareto (a single "
                "objective is validation accuracy)"
            )
        if self.trials < 0:
            raise StudyError(f"tuning.trials must be >= 0, got {self.trials}")
        for key, allowed in (
            ("sampler", tuple(SAMPLERS)),
            ("metric", ("val_acc",)),
            ("mode", ("single", "pareto")),
            ("pruner", tuple(PRUNERS)),
        ):
            if getattr(self, key) not in allowed:
                raise StudyError(f"tuning.{key} {getattr(self, key)!r} must be one of {allowed}")


@dataclass(frozen=True)
class DataConfig:
    """Which images a study uses.

    Attributes:
        val_size: images carved from train (fixed seed) for validation; None = the dataset default.
        train_subset: use only this many training images (after the validation split); None = all.
        test_subset: use only this many test images; None = all.
        split_seed: seed of the validation split and the subsets.
    """

    val_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    split_seed: int = 0


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: the dense baseline and the compressed model, both deployed,
    timed interleaved under the same device, backend, batch and threads.

    Attributes:
        device: "cpu", "cuda" or "cuda:N"; None = the training device (``--device``).
        batch_sizes: the batches timed; the first is the headline (``latency_ms``, ``speedup``).
        backends: "torch" (eager PyTorch on ``device``) and/or "onnxruntime" (the deployed model
            exported to ONNX, timed in ONNX Runtime's CPU session); the first is the headline.
        threads: CPU threads of torch and of ONNX Runtime's intra-op pool.
        min_run_time: seconds of timing per model per case (a tuning trial times a tenth of it,
            at most 0.1 s).
        batch_size: the older one-batch spelling, ``batch_size: 64`` == ``batch_sizes: [64]``
            (read, then folded into ``batch_sizes``).
    """

    device: str | None = None
    batch_sizes: tuple[int, ...] = (32,)
    backends: tuple[str, ...] = ("torch",)
    threads: int = 2
    min_run_time: float = 0.5
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            if self.batch_sizes not in ((32,), (self.batch_size,)):
                raise StudyError(
                    f"batch_size ({self.batch_size}) and batch_sizes "
                    f"({list(self.batch_sizes)}) disagree: give batch_sizes only"
                )
            object.__setattr__(self, "batch_sizes", (self.batch_size,))
            object.__setattr__(self, "batch_size", None)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise StudyError(
                f"batch_sizes {list(self.batch_sizes)} must list batches >= 1, e.g. [1, 32]"
            )
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise StudyError(f"batch_sizes {list(self.batch_sizes)} lists a batch twice")
        unknown = [b for b in self.backends if b not in LATENCY_BACKENDS]
        if not self.backends or unknown or len(set(self.backends)) != len(self.backends):
            raise StudyError(
                f"backends {list(self.backends)} must list some of "
                f"{list(LATENCY_BACKENDS)}, each once (the first is the headline)"
            )
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise StudyError(
                f"device {self.device!r} must be cpu, cuda or cuda:N (or leave it out: "
                "the training device)"
            )
        if self.threads < 1 or not self.min_run_time > 0:
            raise StudyError(
                f"threads must be >= 1 and min_run_time > 0 (got {self.threads}, "
                f"{self.min_run_time})"
            )


@dataclass(frozen=True)
class Study:
    """A whole sweep: one model on one dataset, several methods at several targets.

    Attributes:
        name: kebab-case study name == file name == MLflow experiment.
        model: a CIFAR model of ``bench.models`` or any timm model name.
        dataset: fashion-mnist, cifar10, cifar100, imagenet or synthetic.
        methods: registered method names.
        ratios: params compression targets (numbers > 1) or per-layer rate specs
            ("[0.5]*7+[0.95]*5").
        seeds: seeds of the final runs (and of their baselines).
        width: channel-width multiplier of the CIFAR models (None = 1.0).
        method_args: per-method hyperparameter defaults, e.g. {freq_lowrank: {gamma: 0.7}}.
        bn_recalibration_batches: training batches (of ``finetune.batch_size``) that re-estimate
            every BatchNorm's statistics after compression, before the pre-fine-tuning
            evaluation and the fine-tuning, for every method alike; 0 turns it off.
    """

    name: str
    model: str
    dataset: str
    methods: tuple[str, ...]
    ratios: tuple[float | str, ...]
    seeds: tuple[int, ...] = (0,)
    width: float | None = None
    baseline: Recipe = field(default_factory=lambda: Recipe(epochs=30, lr=0.1))
    finetune: Recipe = field(default_factory=lambda: Recipe(epochs=5, lr=0.01))
    tuning: TuningConfig = field(default_factory=TuningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    bn_recalibration_batches: int = 20
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        out["ratios"] = list(self.ratios)
        out["seeds"] = list(self.seeds)
        out["latency"] |= {k: list(out["latency"][k]) for k in ("batch_sizes", "backends")}
        del out["latency"]["batch_size"]  # folded into batch_sizes
        out["tuning"]["objectives"] = list(out["tuning"]["objectives"])
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able config (sorted keys): the run keys and checkpoint names."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ------------------------------------------------------------------------------------- parsing
def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args, True
    return [tp], False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted as floats)."""
    options, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise StudyError(f"{where} must not be empty")
    for opt in options:
        if opt is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is bool and isinstance(value, bool):
            return value
        if opt is str and isinstance(value, str):
            return value
        origin = typing.get_origin(opt)
        if origin is dict and isinstance(value, dict):
            return {str(k): dict(v) if isinstance(v, dict) else v for k, v in value.items()}
        if origin is tuple and isinstance(value, list | tuple):
            (item_tp, _) = typing.get_args(opt)
            return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise StudyError(f"{where} must be {names}, got {value!r}")


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise StudyError(f"{where} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise StudyError(
                f"{where}: unknown key {key!r}{_did_you_mean(key, known)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        sub = f"{where}.{key}" if where.count(":") else f"{where}: {key}"
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    try:
        return cls(**kwargs)
    except StudyError as err:
        raise StudyError(f"{where}: {err}") from None
    except TypeError as err:  # a required key is missing
        missing = str(err).split("argument")[-1].strip(": ")
        raise StudyError(f"{where}: missing required key {missing}") from None


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise StudyError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"finetune.epochs=1"`` -> ("finetune.epochs", 1); the value is a YAML scalar or list."""
    if "=" not in text:
        raise StudyError(f"--set {text!r}: write KEY=VALUE, e.g. --set finetune.epochs=1")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise StudyError(f"--set {text!r}: the value is not valid YAML") from None


def list_studies(folder: Path = SWEEPS_DIR) -> list[str]:
    """Names of the study files in ``folder``."""
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "reference")


def find_study(name_or_path: str, folder: Path = SWEEPS_DIR) -> Path:
    """``sweeps/<name>.yaml``, or a path to a YAML file; unknown names get a did-you-mean."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = list_studies(folder)
    raise StudyError(
        f"no study {name_or_path!r} in {folder}{_did_you_mean(name_or_path, names)}; "
        f"available: {', '.join(names)}"
    )


def load_study(
    name_or_path: str, overrides: tuple[str, ...] = (), folder: Path = SWEEPS_DIR
) -> Study:
    """Load, override and type-check a study (names of models and methods are checked by
    :func:`bench.sweep.validate_study`, which needs the registries)."""
    path = find_study(name_or_path, folder)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise StudyError(
            f"{path}:{line} is not valid YAML: {getattr(err, 'problem', err)}"
        ) from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study is a mapping of keys (name, model, dataset, ...)")
    for text in overrides:
        key, value = parse_override(text)
        top = key.split(".")[0]
        if top not in {f.name for f in fields(Study)}:
            known = [f.name for f in fields(Study)]
            raise StudyError(f"--set {key}: unknown key {top!r}{_did_you_mean(top, known)}")
        _set_path(raw, key, value)
    raw.setdefault("name", path.stem)
    study = _build(Study, raw, str(path))
    if study.name != path.stem and path.parent == folder:
        raise StudyError(f"{path}: name {study.name!r} must equal the file name {path.stem!r}")
    return _check_values(study, str(path))


def _check_values(study: Study, where: str) -> Study:
    if not study.methods:
        raise StudyError(f"{where}: methods is empty: list at least one method, e.g. [l1_filter]")
    if not study.ratios:
        raise StudyError(f"{where}: ratios is empty: list targets, e.g. [2, 4]")
    if not study.seeds:
        raise StudyError(f"{where}: seeds is empty: list at least one seed, e.g. [0]")
    if len(set(study.methods)) != len(study.methods):
        raise StudyError(f"{where}: methods lists a method twice")
    ratios = []
    for i, ratio in enumerate(study.ratios):
        if isinstance(ratio, str):
            try:
                Target.parse(ratio)
            except MethodConfigError as err:
                raise StudyError(f"{where}: ratios[{i}]: {err}") from None
            ratios.append(ratio)
        elif not ratio > 1:
            raise StudyError(
                f"{where}: ratios[{i}] = {ratio} must be a number > 1 (2 = half the params)"
            )
        else:
            ratios.append(float(ratio))
    if study.width is not None and not 0 < study.width <= 4:
        raise StudyError(f"{where}: width {study.width} must lie in (0, 4]")
    if study.bn_recalibration_batches < 0:
        raise StudyError(
            f"{where}: bn_recalibration_batches = {study.bn_recalibration_batches} must be >= 0 "
            "(0 turns the BatchNorm re-estimation off)"
        )
    return replace(study, ratios=tuple(ratios))


def check_data(study: Study) -> None:
    """Refuse, with the numbers, data settings that would run and measure nothing: an unknown
    dataset, no validation images (every accuracy 0 %), subsets larger than the data, and a
    training split smaller than one batch or epochs shorter than one step (training drops the
    last partial batch, so nothing would be trained). Reads no data: sizes come from
    :func:`bench.dataset_info.split_sizes` (a dataset whose size only its files tell, an ImageNet
    folder, is checked when it is loaded)."""
    where = f"study {study.name}"
    try:
        info = dataset_info(study.dataset)
    except DataError as err:
        raise StudyError(f"{where}: dataset: {err}") from None
    d = study.data
    try:
        train, _, _ = split_sizes(info, d.val_size, d.train_subset, d.test_subset)
    except DataError as err:
        raise StudyError(f"{where}: data.{err}") from None
    if train is None:
        return
    trial_epochs = study.tuning.epochs if study.tuning.trials else None  # None: finetune's
    for key, recipe, epochs in (
        ("baseline", study.baseline, study.baseline.epochs),
        ("finetune", study.finetune, study.finetune.epochs),
        ("tuning", study.finetune, trial_epochs),
    ):
        if not epochs:  # 0: no training asked for
            continue
        steps = train // recipe.batch_size
        size = "baseline" if key == "baseline" else "finetune"
        if steps == 0:
            raise StudyError(
                f"{where}: {size}.batch_size = {recipe.batch_size} is more than the {train} "
                f"training images (data.train_subset, data.val_size): training drops a partial "
                f"batch, so nothing would be trained; use {size}.batch_size <= {train}"
            )
        if round(epochs * steps) == 0:
            raise StudyError(
                f"{where}: {key}.epochs = {epochs:g} is no training step ({steps} batches of "
                f"{recipe.batch_size} per epoch, {train} images): use at least {1 / steps:.3g} "
                "epochs"
            )
