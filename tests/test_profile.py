"""bench.profile: footprints in seconds, the literature's figures, JSON output, bad input."""

import json

import pytest

from bench.cli import main_guard
from bench.profile import main as profile_main

profile = main_guard(profile_main, "bench.profile")
VGG = ["--model", "vgg16_bn_cifar", "--dataset", "cifar10"]  # the papers' VGG-16 on CIFAR-10


def run_json(capsys, *args):
    assert profile(["--json", "--no-latency", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("model", "params", "macs"),
    [  # HRank / DCTPruning tables: params, FLOPs (= MACs) at 32x32, 10 classes
        ("vgg16_bn_cifar", 14.98e6, 313.73e6),
        ("resnet20_cifar", 0.27e6, 40.81e6),
        ("resnet56_cifar", 0.85e6, 125.49e6),
        ("resnet110_cifar", 1.72e6, 252.89e6),
    ],
)
def test_literature_figures(capsys, model, params, macs):
    out = run_json(capsys, "--model", model, "--dataset", "cifar10")
    assert out["dense"]["params"] == pytest.approx(params, rel=0.01)
    assert out["dense"]["macs"] == pytest.approx(macs, rel=0.01)


def test_paper_dct_pruning_configuration(capsys):
    out = run_json(capsys, *VGG, "--method", "dct_pruning", "--layer-rates", "[0.5]*7+[0.95]*5")
    # DCTPruning reports params -94.2 %, FLOPs -84.1 % for exactly this configuration (percent)
    assert out["params_reduction"] == pytest.approx(94.2, abs=0.2)
    assert out["macs_reduction"] == pytest.approx(84.1, abs=0.2)
    kept = [row["filters_after"] for row in out["compressed"]["layers"] if "filters_after" in row]
    assert kept[:12] == [32, 32, 64, 64, 128, 128, 128, 26, 26, 26, 26, 26]


def test_ratio_and_latency_table(capsys):
    args = [
        "--model",
        "vgg16_bn_cifar",
        "--width",
        "0.25",
        "--dataset",
        "fashion-mnist",
        "--method",
        "l1_filter",
        "--ratio",
        "2",
        "--batch-size",
        "4",
    ]
    assert profile(args) == 0
    text = capsys.readouterr().out
    assert "FLOPs (MACs)" in text and "latency (ms)" in text and "measured speedup" in text
    out = run_json(capsys, *args)
    assert out["params_ratio"] == pytest.approx(2, rel=0.02)
    assert out["params_reduction"] == pytest.approx(100 * (1 - 1 / out["params_ratio"]))
    assert f"params -{out['params_reduction']:.1f}% (" in text  # the same percent, printed
    assert out["compressed"]["params"] < out["dense"]["params"]
    assert out["input_shape"] == [1, 28, 28]


def test_list_names_every_method_model_and_dataset(capsys):
    from bench.data import DATASETS
    from bench.models import list_cifar_models
    from methods.base import get_method_class, list_methods

    assert profile(["--list"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name in list_methods():
        family = get_method_class(name).family
        assert rows[name].split()[1] == family, rows[name]
    assert "DCT energy of the feature maps" in rows["dct_pruning"]  # its module docstring's line
    for name in list_cifar_models():
        assert "for CIFAR" in rows[name]
    assert "timm" in text and all(name in text for name in DATASETS)
    assert profile(["--list", "--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in cat["methods"]] == list_methods()
    magnitude = next(m for m in cat["methods"] if m["name"] == "magnitude")
    assert magnitude["family"] == "spatial" and magnitude["structured"] is False
    assert [m["name"] for m in cat["models"]] == list_cifar_models()
    assert cat["timm_models"] > 100 and cat["datasets"] == list(DATASETS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*VGG, "--method", "dct_pruning", "--layer-rates", "[0.5]*3"], "give exactly 12"),
        ([*VGG, "--method", "dct_pruning", "--layer-rates", "[1.5]*12"], "outside [0, 1)"),
        ([*VGG, "--method", "l1_filtr", "--ratio", "2"], "did you mean 'l1_filter'"),
        ([*VGG, "--method", "l1_filter"], "needs a target"),
        ([*VGG, "--method", "dct_pruning", "--ratio", "2", "--set", "band=mid"], "band"),
        ([*VGG, "--ratio", "2"], "need --method"),
        (["--model", "nope_net", "--dataset", "cifar10"], "unknown model"),
        (["--dataset", "cifar10"], "--model and --dataset are needed"),
    ],
)
def test_bad_input(capsys, args, message):
    assert profile(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
