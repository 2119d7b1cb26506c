"""Where results live by default. Pure Python (no torch): ``reports`` imports it too.

Everything goes under one results folder, ``./results`` unless ``FREQBENCH_RESULTS`` says otherwise:
``mlflow.db`` (tracking), ``optuna.db`` (tuning), ``checkpoints/`` (baselines), ``logs/``
(tracebacks), ``<study>/report/`` (reports).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_storage", "default_tracking_uri", "results_dir", "sqlite_uri"]


def results_dir() -> Path:
    """The results folder (absolute), from ``FREQBENCH_RESULTS`` or ``./results``."""
    return Path(os.environ.get("FREQBENCH_RESULTS", "results")).expanduser().resolve()


def sqlite_uri(path: Path) -> str:
    """``sqlite:///`` URI of an absolute path (SQLAlchemy: three slashes + the absolute path)."""
    return f"sqlite:///{Path(path).resolve()}"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<results>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(results_dir() / "mlflow.db")


def default_storage() -> str:
    """The Optuna storage URL: ``FREQBENCH_OPTUNA_STORAGE`` or ``sqlite:///<results>/optuna.db``."""
    return os.environ.get("FREQBENCH_OPTUNA_STORAGE") or sqlite_uri(results_dir() / "optuna.db")
