"""Optuna samplers and pruners by name: the values a study's ``tuning.sampler`` and
``tuning.pruner`` may take. A new one is one entry here (a factory taking the study's
:class:`bench.study.TuningConfig`); ``bench.study`` checks a study's names against these keys.

``tuning.mode: pareto`` always samples with NSGA-II (:func:`pareto_sampler`) and never prunes:
Optuna has no pruning for multi-objective studies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:  # bench.study imports this module: annotations only, no import cycle
    from bench.study import TuningConfig

__all__ = ["PRUNERS", "SAMPLERS", "pareto_sampler"]


def _tpe(cfg: TuningConfig) -> optuna.samplers.BaseSampler:
    """TPE after random startup trials: half the budget, at least 2 and at most 10."""
    startup = min(10, max(2, cfg.trials // 2))
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)


SAMPLERS: dict[str, Callable[[TuningConfig], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda cfg: optuna.samplers.RandomSampler(seed=cfg.seed),
}

PRUNERS: dict[str, Callable[[TuningConfig], optuna.pruners.BasePruner]] = {
    # stop a trial below the median of earlier trials at the same epoch, after 2 trials
    "median": lambda cfg: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    "none": lambda cfg: optuna.pruners.NopPruner(),
}


def pareto_sampler(cfg: TuningConfig) -> optuna.samplers.BaseSampler:
    """NSGA-II, seeded: validation accuracy up, MACs down."""
    return optuna.samplers.NSGAIISampler(seed=cfg.seed)
