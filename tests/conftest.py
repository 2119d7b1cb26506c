"""Shared test setup: offline, quiet, CPU, two threads; each test gets its own results folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A fresh results folder (MLflow, Optuna, checkpoints) for one test."""
    root = tmp_path / "results"
    monkeypatch.setenv("FREQBENCH_RESULTS", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FREQBENCH_OPTUNA_STORAGE", raising=False)
    return root
