"""Optuna samplers and pruners by name: the values a study's ``tuning.sampler`` and
``tuning.pruner`` may take. A new one is one entry here (a factory taking the study's
:class:`bench.study.TuningConfig`); ``bench.study`` checks a study's names against these keys.

``tuning.mode: pareto`` always samples with NSGA-II (:func:`pareto_sampler`) and never prunes:
Optuna has no pruning for multi-objective studies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bench.study imports this module: annotations only, no import cycle
    import optuna

    from bench.study import TuningConfig

# optuna (numpy, SQLAlchemy: 0.3 s or more) is imported by the factories, not here: a study's
# names are checked against these keys before anything heavy is loaded

__all__ = ["PRUNERS", "SAMPLERS", "pareto_sampler"]


def _tpe(cfg: TuningConfig) -> optuna.samplers.BaseSampler:
    """TPE after random startup trials: half the budget, at least 2 and at most 10."""
    import optuna

    startup = min(10, max(2, cfg.trials // 2))
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)


def _random(cfg: TuningConfig) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _median(cfg: TuningConfig) -> optuna.pruners.BasePruner:
    """Stop a trial below the median of earlier trials at the same epoch, after 2 trials."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def _no_pruner(cfg: TuningConfig) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()


SAMPLERS: dict[str, Callable[[TuningConfig], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": _random,
}

PRUNERS: dict[str, Callable[[TuningConfig], optuna.pruners.BasePruner]] = {
    "median": _median,
    "none": _no_pruner,
}


def pareto_sampler(cfg: TuningConfig) -> optuna.samplers.BaseSampler:
    """NSGA-II, seeded: validation accuracy up, MACs down."""
    import optuna

    return optuna.samplers.NSGAIISampler(seed=cfg.seed)
