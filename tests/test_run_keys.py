"""Keys of runs already recorded must not change: a rerun finds them by key and skips them.

The hex strings below were computed before the run-spec refactor (issue #11) on the ``smoke``
study; a change to any of them would make every recorded run of every study look unfinished.
"""

import dataclasses

import pytest

from bench.runner import Sweep
from bench.runs import BaselineSpec, RunSpec, method_defaults
from bench.study import load_study
from bench.tuning import Tuner

OPTUNA_STUDY = "smoke/vgg16_bn_cifar/fashion-mnist/l1_filter/2"


@pytest.fixture
def study():
    return load_study("smoke")


def test_baseline_key_and_checkpoint_name(study):
    spec = BaselineSpec.of(study, 0)
    assert spec.key == "e53c88bc09db188a"
    assert spec.checkpoint_name == "vgg16_bn_cifar-w0.125-fashion-mnist-s0-e53c88bc09db188a.pt"
    assert Sweep(study, tracker=None).checkpoint_path(0).name == spec.checkpoint_name


def test_final_tune_and_parent_keys(study):
    hps = method_defaults(study, "l1_filter")
    assert hps == {"allocation": "uniform"}
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "e00c4b4de8cc8d12"
    magnitude = method_defaults(study, "magnitude")
    assert RunSpec.final(study, "magnitude", 2.0, 0, magnitude).key == "166fbc4615a6392f"
    trial = RunSpec.trial(study, "l1_filter", 2.0, hps, number=3, optuna_study=OPTUNA_STUDY)
    assert trial.key == "56915e67bbc39b34"
    assert RunSpec.parent(study, "l1_filter", 2.0).key == "bfa09fe3c74733a6"
    # a tuned study: the tuning config joins the parent's key, never a trial's
    tuned = load_study("smoke", ("tuning.trials=4",))
    trial = RunSpec.trial(tuned, "l1_filter", 2.0, hps, number=3, optuna_study=OPTUNA_STUDY)
    assert trial.key == "56915e67bbc39b34"
    assert RunSpec.parent(tuned, "l1_filter", 2.0).key == "9f31c856a4c9eb30"


def test_per_layer_rates_and_a_second_seed():
    study = load_study("smoke", ("ratios=['[0.5]*13']", "seeds=[0, 1]"))
    hps = method_defaults(study, "l1_filter")
    assert BaselineSpec.of(study, 1).key == "cd27a3d85059e580"
    assert RunSpec.final(study, "l1_filter", "[0.5]*13", 1, hps).key == "af2675a90e1be42d"
    assert RunSpec.parent(study, "l1_filter", "[0.5]*13").key == "384cc8959736974f"


def test_bn_recalibration_off_keeps_its_own_key(study):
    study = dataclasses.replace(study, bn_recalibration_batches=0)
    hps = method_defaults(study, "l1_filter")
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "e7b7bb62efc4598e"


@pytest.mark.parametrize("width", [None, 1.0])
def test_no_width_and_width_one_are_one_baseline(study, width):
    # width 1.0 is the model's own width: the key and checkpoint of a study without a width
    study = dataclasses.replace(study, width=width)
    spec = BaselineSpec.of(study, 0)
    assert spec.key == "36dfbf3efe119b36"
    assert spec.checkpoint_name == "vgg16_bn_cifar-fashion-mnist-s0-36dfbf3efe119b36.pt"
    hps = method_defaults(study, "l1_filter")
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "e4b0ebf1e9e7b73c"


def test_optuna_study_fingerprints(study):
    tuner = Tuner(Sweep(study, tracker=None), "sqlite:////nonexistent/optuna.db")
    assert tuner.fingerprint("l1_filter") == "b7ca580c82be7b3c"
    assert tuner.fingerprint("magnitude") == "73ef7a0834332384"
