"""Where results live by default. Pure Python (no torch): ``reports`` imports it too.

Everything goes under one results folder, ``./results`` unless ``FREQBENCH_RESULTS`` says otherwise:
``mlflow.db`` (tracking), ``optuna.db`` (tuning), ``checkpoints/`` (baselines), ``logs/``
(tracebacks), ``<study>/report/`` (reports).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "default_storage", "default_tracking_uri", "results_dir", "sqlite_uri"]


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


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; moved onto ``path`` when the block ends without
    error, removed otherwise: a kill or a full disk while it is written leaves the file as it was
    (or absent), never half-written. The temp file names its pid (``.<name>.<pid>.tmp``): what a
    killed process left is found by ``bench.stores.remove_leftovers``. Checkpoints, reports and
    the timm-name cache are written through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
