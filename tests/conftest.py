"""Shared test setup: offline, quiet, CPU, two threads; each test gets its own results folder and
starts with the package's methods only (what a test registers is forgotten after it).

Plain helpers shared by several test files live here too; import them with
``from conftest import fresh_vgg`` (tests/ is on sys.path, as for ``_report_fixtures``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import copy
import functools

import pytest
import torch
from torch import nn

import methods
from bench.testing import temporary_registry

torch.set_num_threads(2)

# the methods of the package, before any test registered a toy method or imported a plugin
PACKAGE_METHODS = tuple(methods.list_methods())


@pytest.fixture(autouse=True)
def _isolated_registry():
    """Every test sees the package's methods; toy methods and in-process plugins do not leak."""
    with temporary_registry():
        yield


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A fresh results folder (MLflow, Optuna, checkpoints) for one test."""
    root = tmp_path / "results"
    monkeypatch.setenv("FREQBENCH_RESULTS", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FREQBENCH_OPTUNA_STORAGE", raising=False)
    return root


@functools.cache
def _vgg_once(width: float) -> nn.Module:
    import bench.models

    torch.manual_seed(0)
    return bench.models.create_model(
        "vgg16_bn_cifar", num_classes=10, in_chans=3, width=width
    ).eval()


def fresh_vgg(width: float = 0.25) -> nn.Module:
    """A fresh copy of one VGG-16-BN (CIFAR) of ``width`` built under seed 0, once per session."""
    return copy.deepcopy(_vgg_once(width))
