"""Keys of runs already recorded must not change: a rerun finds them by key and skips them.

The hex strings below were computed before the run-spec refactor (issue #11) on the ``smoke``
study; a change to any of them would make every recorded run of every study look unfinished.
"""

import dataclasses

import pytest

from bench.runner import Sweep
from bench.study import load_study
from bench.tuning import Tuner

TUNE_EXTRA = {"trial": 3, "optuna_study": "smoke/vgg16_bn_cifar/fashion-mnist/l1_filter/2"}


@pytest.fixture
def sweep():
    return Sweep(load_study("smoke"), tracker=None)


def test_baseline_key_and_checkpoint_name(sweep):
    assert sweep.baseline_key(0) == "e53c88bc09db188a"
    assert sweep.checkpoint_path(0).name == (
        "vgg16_bn_cifar-w0.125-fashion-mnist-s0-e53c88bc09db188a.pt"
    )


def test_final_tune_and_parent_keys(sweep):
    hps = sweep.method_defaults("l1_filter")
    assert hps == {"allocation": "uniform"}
    assert sweep.compressed_key("final", "l1_filter", "2", 0, hps) == "e00c4b4de8cc8d12"
    magnitude = sweep.method_defaults("magnitude")
    assert sweep.compressed_key("final", "magnitude", "2", 0, magnitude) == "166fbc4615a6392f"
    assert sweep.compressed_key("tune", "l1_filter", "2", 0, hps, TUNE_EXTRA) == "56915e67bbc39b34"
    untuned = {"tuning": None, "seeds": [0]}
    assert sweep.compressed_key("parent", "l1_filter", "2", -1, hps, untuned) == "bfa09fe3c74733a6"
    tuned = {"tuning": dataclasses.asdict(sweep.study.tuning), "seeds": [0]}
    assert sweep.compressed_key("parent", "l1_filter", "2", -1, hps, tuned) == "05f2cc766fa4af80"


def test_bn_recalibration_off_keeps_its_own_key():
    study = dataclasses.replace(load_study("smoke"), bn_recalibration_batches=0)
    sweep = Sweep(study, tracker=None)
    hps = sweep.method_defaults("l1_filter")
    assert sweep.compressed_key("final", "l1_filter", "2", 0, hps) == "e7b7bb62efc4598e"


def test_no_width_keys():
    study = dataclasses.replace(load_study("smoke"), width=None)
    sweep = Sweep(study, tracker=None)
    assert sweep.baseline_key(0) == "36dfbf3efe119b36"
    assert sweep.checkpoint_path(0).name == "vgg16_bn_cifar-fashion-mnist-s0-36dfbf3efe119b36.pt"
    hps = sweep.method_defaults("l1_filter")
    assert sweep.compressed_key("final", "l1_filter", "2", 0, hps) == "e4b0ebf1e9e7b73c"


def test_optuna_study_fingerprints(sweep):
    tuner = Tuner(sweep, "sqlite:////nonexistent/optuna.db")
    assert tuner.fingerprint("l1_filter") == "b7ca580c82be7b3c"
    assert tuner.fingerprint("magnitude") == "73ef7a0834332384"
