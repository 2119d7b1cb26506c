"""Run keys: recorded keys never change by accident, and they change when the code does.

The hex strings below are pinned on the ``smoke`` study: a change to any of them makes every
recorded run of every study look unfinished. Baseline keys date from before the run-spec
refactor (issue #11) and have never changed. The compressed keys were re-pinned once, on purpose,
when the method's code fingerprint joined them (issue #12); the fingerprint is fixed here
(:func:`fixed_fingerprints`) so that editing a method does not move these pins: what an edit does
to a key is tested below on a plugin method of its own.
"""

import dataclasses
import importlib
import re
import sys
import textwrap

import pytest

from bench import code_version
from bench.runner import Sweep
from bench.runs import BaselineSpec, RunSpec, method_defaults
from bench.study import load_study
from bench.testing import temporary_registry
from bench.tuning import Tuner

OPTUNA_STUDY = "smoke/vgg16_bn_cifar/fashion-mnist/l1_filter/2"
FINGERPRINTS = {"l1_filter": "1" * 16, "magnitude": "2" * 16}


@pytest.fixture(autouse=True)
def fixed_fingerprints(monkeypatch):
    monkeypatch.setattr(code_version, "method_fingerprint", FINGERPRINTS.__getitem__)


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
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "e481eb50b4d9170b"
    magnitude = method_defaults(study, "magnitude")
    assert RunSpec.final(study, "magnitude", 2.0, 0, magnitude).key == "0bbbd9b87c1b1fb8"
    trial = RunSpec.trial(study, "l1_filter", 2.0, hps, number=3, optuna_study=OPTUNA_STUDY)
    assert trial.key == "5af88b46760ac198"
    assert RunSpec.parent(study, "l1_filter", 2.0).key == "cab736b6eb6bd583"
    # a tuned study: the tuning config joins the parent's key, never a trial's
    tuned = load_study("smoke", ("tuning.trials=4",))
    trial = RunSpec.trial(tuned, "l1_filter", 2.0, hps, number=3, optuna_study=OPTUNA_STUDY)
    assert trial.key == "5af88b46760ac198"
    assert RunSpec.parent(tuned, "l1_filter", 2.0).key == "fb9ecd4147f78bdd"


def test_per_layer_rates_and_a_second_seed():
    study = load_study("smoke", ("ratios=['[0.5]*13']", "seeds=[0, 1]"))
    hps = method_defaults(study, "l1_filter")
    assert BaselineSpec.of(study, 1).key == "cd27a3d85059e580"
    assert RunSpec.final(study, "l1_filter", "[0.5]*13", 1, hps).key == "7208a3672c8d67ad"
    assert RunSpec.parent(study, "l1_filter", "[0.5]*13").key == "a825dd8329c238d2"


def test_bn_recalibration_off_keeps_its_own_key(study):
    study = dataclasses.replace(study, bn_recalibration_batches=0)
    hps = method_defaults(study, "l1_filter")
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "f947c381e5b07fb0"


@pytest.mark.parametrize("width", [None, 1.0])
def test_no_width_and_width_one_are_one_baseline(study, width):
    # width 1.0 is the model's own width: the key and checkpoint of a study without a width
    study = dataclasses.replace(study, width=width)
    spec = BaselineSpec.of(study, 0)
    assert spec.key == "36dfbf3efe119b36"
    assert spec.checkpoint_name == "vgg16_bn_cifar-fashion-mnist-s0-36dfbf3efe119b36.pt"
    hps = method_defaults(study, "l1_filter")
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key == "405719fcc90b7177"


def test_optuna_study_fingerprints(study):
    tuner = Tuner(Sweep(study, tracker=None), "sqlite:////nonexistent/optuna.db")
    assert tuner.fingerprint("l1_filter") == "23c0e86e8d6c1005"
    assert tuner.fingerprint("magnitude") == "7b709b8f49069db2"


# ------------------------------------------------------------------------ code versions
def test_every_run_is_tagged_with_its_code_version(study):
    base = BaselineSpec.of(study, 0).tags("smoke", "abc", cached=False)
    assert base["code_version"] == "h1" and base["git_sha"] == "abc"
    hps = method_defaults(study, "l1_filter")
    for spec in (
        RunSpec.final(study, "l1_filter", 2.0, 0, hps),
        RunSpec.parent(study, "l1_filter", 2.0),
        RunSpec.trial(study, "l1_filter", 2.0, hps, number=0, optuna_study=OPTUNA_STUDY),
    ):
        assert spec.tags("smoke", "abc")["code_version"] == "h1-11111111"


def test_a_harness_bump_changes_every_key(study, monkeypatch):
    hps = method_defaults(study, "l1_filter")

    def keys():
        specs = [
            BaselineSpec.of(study, 0),
            RunSpec.final(study, "l1_filter", 2.0, 0, hps),
            RunSpec.parent(study, "l1_filter", 2.0),
            RunSpec.trial(study, "l1_filter", 2.0, hps, number=0, optuna_study=OPTUNA_STUDY),
        ]
        tuner = Tuner(Sweep(study, tracker=None), "sqlite:////nonexistent/optuna.db")
        return [s.key for s in specs] + [tuner.fingerprint("l1_filter")]

    before = keys()
    monkeypatch.setattr(code_version, "HARNESS_VERSION", 2)
    after = keys()
    assert all(a != b for a, b in zip(before, after))
    assert BaselineSpec.of(study, 0).tags("s", "x", cached=False)["code_version"] == "h2"


def test_a_method_fingerprint_changes_its_keys_only(study, monkeypatch):
    hps = method_defaults(study, "l1_filter")
    l1 = RunSpec.final(study, "l1_filter", 2.0, 0, hps).key
    magnitude = RunSpec.final(study, "magnitude", 2.0, 0, method_defaults(study, "magnitude")).key
    monkeypatch.setitem(FINGERPRINTS, "l1_filter", "3" * 16)
    assert RunSpec.final(study, "l1_filter", 2.0, 0, hps).key != l1
    assert RunSpec.final(study, "magnitude", 2.0, 0, method_defaults(study, "magnitude")).key == (
        magnitude
    )
    assert BaselineSpec.of(study, 0).key == "e53c88bc09db188a"  # methods never move baselines


# A plugin method in a package of its own, with a private helper module it imports.
HELPER = '''
"""Helper."""

SCALE = 1.0
'''
METHOD = '''
"""A toy method (plugin) for the code fingerprint."""

from methods._masks import apply_mask
from methods.base import CompressionMethod, register_method

from fp_plugin._helper import SCALE


@register_method
class FingerprintProbe(CompressionMethod):
    name = "fingerprint_probe"
    family = "spatial"

    def __init__(self, keep: float = 0.5) -> None:
        self.keep = keep

    def compress(self, model, target, data, finetune):
        return model  # never run here
'''
# The same code: comments, docstrings, blank lines, quotes and line breaks changed.
METHOD_RESTYLED = """
# a comment at the top
from methods._masks import apply_mask   # masks
from methods.base import (
    CompressionMethod,
    register_method,
)

from fp_plugin._helper import SCALE


@register_method
class FingerprintProbe(CompressionMethod):
    '''Another docstring, longer than the first.'''

    name = 'fingerprint_probe'
    family = 'spatial'

    def __init__(self, keep: float = 0.5) -> None:
        '''It keeps things.'''
        self.keep = keep  # a fraction


    def compress(self, model, target, data, finetune):
        return model
"""


def _fingerprint(tmp_path, version: str, method: str, helper: str = HELPER):
    """Import ``fp_plugin.method`` written from ``method`` and ``helper`` into a fresh folder;
    returns (its fingerprint, its final run key on the smoke study)."""
    root = tmp_path / version / "fp_plugin"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text(f"# {version}\n")  # package files are not followed
    (root / "_helper.py").write_text(textwrap.dedent(helper))
    (root / "method.py").write_text(textwrap.dedent(method))
    for name in [n for n in sys.modules if n.split(".")[0] == "fp_plugin"]:
        del sys.modules[name]
    sys.path.insert(0, str(root.parent))
    try:
        with temporary_registry():
            importlib.import_module("fp_plugin.method")
            fingerprint = code_version.method_fingerprint("fingerprint_probe")
            study = dataclasses.replace(load_study("smoke"), methods=("fingerprint_probe",))
            hps = method_defaults(study, "fingerprint_probe")
            key = RunSpec.final(study, "fingerprint_probe", 2.0, 0, hps).key
    finally:
        sys.path.remove(str(root.parent))
        for name in [n for n in sys.modules if n.split(".")[0] == "fp_plugin"]:
            del sys.modules[name]
    return fingerprint, key


def test_editing_a_method_changes_its_key_but_a_comment_does_not(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real fingerprints
    first, key = _fingerprint(tmp_path, "v1", METHOD)
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert _fingerprint(tmp_path, "v2", METHOD_RESTYLED) == (first, key)
    # a changed default, a changed line of code, a changed private helper: other keys
    edits = [
        METHOD.replace("keep: float = 0.5", "keep: float = 0.25"),
        METHOD.replace("return model  #", "return model.eval()  #"),
    ]
    seen = {key}
    for i, method in enumerate(edits):
        _, edited = _fingerprint(tmp_path, f"edit{i}", method)
        assert edited not in seen
        seen.add(edited)
    _, helped = _fingerprint(tmp_path, "helper", METHOD, HELPER.replace("1.0", "2.0"))
    assert helped not in seen


def test_a_fingerprint_covers_the_private_modules_a_method_imports(monkeypatch):
    monkeypatch.undo()
    from methods.base import list_methods

    list_methods()  # loads the registry (the package's methods)

    assert set(code_version._module_digests("methods.l1_filter")) == {
        "methods.l1_filter",
        "methods.base",
        "methods._structured",  # imported by l1_filter
        "methods._structured_graph",  # by _structured, and so on
        "methods._allocation",
        "methods._modules",
        "methods._checks",
        "methods._targets",  # by base
    }
    # one process, one fingerprint: asking again reads nothing
    assert code_version.method_fingerprint("lrsd") == code_version.method_fingerprint("lrsd")
    assert code_version.method_fingerprint("lrsd") != code_version.method_fingerprint("svd")


def test_source_digest_ignores_comments_docstrings_and_layout():
    digest = code_version.source_digest
    plain = "def f(x):\n    return x + 1\n"
    assert digest(plain) == digest('def f(x):\n    """Add one."""\n    return (x +\n 1)  # one\n')
    assert digest(plain) != digest("def f(x):\n    return x + 2\n")
    assert digest(plain) != digest("def f(y):\n    return y + 1\n")
