"""Every registered method on timm CNNs built of grouped, depthwise and gated convs (issue 12).

Random weights, 10 classes, CIFAR-sized input, no fine-tuning, one tiny synthetic calibration
batch: these tests check structure and reach (ratio within the solvers' 2 %, finite outputs, the
output shape), not accuracy. ``benchmarks/timm_zoo.py`` prints the full model x method table at 2x
and 4x on the six models of the issue.
"""

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import bench.models
import methods
from methods._lowrank import LowRank
from methods.base import (
    CalibData,
    CompressionWarning,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
    stored_params,
)

SHAPE = (3, 32, 32)
DATA = CalibData.synthetic(SHAPE, 10, n_batches=1, batch_size=8)
MODELS = [
    "regnetx_002",  # grouped 3 x 3 convs (group width 8) in residual bottlenecks
    "mobilenetv2_050",  # depthwise convs, inverted residuals
    pytest.param("mobilenetv3_small_050", marks=pytest.mark.slow),  # + squeeze-excitation gates
    pytest.param("convnext_atto", marks=pytest.mark.slow),  # depthwise 7 x 7 on residual streams
]
# Cheaper settings where a method's defaults cost tens of seconds on these models; the structure
# paths are the same (lrsd's sparse branch does not touch grouped or depthwise convs: they stay
# dense either way).
FAST = {"lrsd": {"sparse_share": 0.0, "n_samples": 8}, "freq_lowrank": {"max_rounds": 2}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these are many small ops, where a second thread (spinning while the
    machine's other core is busy) cost 3-10x the time here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _dense(name: str) -> nn.Module:
    torch.manual_seed(0)
    return bench.models.create_model(name, num_classes=10, in_chans=3).eval()


def dense(name: str) -> nn.Module:
    return copy.deepcopy(_dense(name))


def compress(method: str, model: nn.Module, target: Target, **hyper) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        instance = create_method(method, **{**FAST.get(method, {}), **hyper})
        return instance.compress(model, target, DATA, no_finetune())


def no_empty_groups(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] > 0 and m.weight.shape[1] > 0, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name


@pytest.mark.parametrize("method", methods.list_methods())
@pytest.mark.parametrize("model_name", MODELS)
def test_every_method_reaches_2x_on_timm_cnns(model_name, method):
    model = dense(model_name)
    before = count_params(model)
    out = compress(method, model, Target(ratio=2.0))
    achieved = before / stored_params(out)
    assert abs(achieved / 2.0 - 1.0) <= 0.02, achieved
    with torch.no_grad():
        y = out.eval()(torch.randn(2, *SHAPE))
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    no_empty_groups(out)


@pytest.mark.parametrize("method", ["l1_filter", "random", "dct_pruning"])
def test_grouped_convs_are_never_pruned_to_zero_channels(method):
    # regression: l1_filter on regnetx_002 at 2x died with "Given groups=3, weight of size
    # [24, 0, 3, 3]": the 1 x 1 conv feeding a grouped conv lost more filters than it has groups
    model = dense("regnetx_002")
    grouped = {n: m.groups for n, m in model.named_modules() if getattr(m, "groups", 1) > 1}
    out = compress(method, model, Target(ratio=2.0))
    no_empty_groups(out)
    assert {n: out.get_submodule(n).groups for n in grouped} == grouped
    rows = create_method(method).layer_table(out)
    blocks = {r["layer"]: r["channel_groups"] for r in rows}
    # s1's conv1 feeds a 3-group conv, which is itself pruned in 3 blocks of its 24 filters
    assert blocks["s1.b1.conv1.conv"] == blocks["s1.b1.conv2.conv"] == 3
    assert all(r["filters_after"] % r["channel_groups"] == 0 for r in rows)


def test_every_group_of_a_grouped_conv_keeps_a_channel_at_extreme_rates():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(12, 6, 1),
        nn.Flatten(),
        nn.LazyLinear(10),
    )
    model(torch.zeros(1, *SHAPE))
    out = compress("l1_filter", model, Target(layer_rates=(0.99, 0.99)))
    assert [out[0].out_channels, out[2].in_channels, out[2].out_channels] == [4, 4, 4]
    assert out[2].groups == 4 and out(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_grouped_convs_are_factorised_per_group_and_depthwise_left_alone_with_a_reason():
    model = dense("regnetx_002")
    out = compress("svd", model, Target(ratio=2.0))
    conv2 = out.s1.b1.conv2.conv
    assert isinstance(conv2, LowRank) and conv2.groups == 3
    assert conv2[0].groups == conv2[1].groups == 3
    rows = {r["layer"]: r for r in create_method("svd").layer_table(out)}
    assert rows["s1.b1.conv2.conv"]["groups"] == 3
    mobile = compress("svd", dense("mobilenetv2_050"), Target(ratio=2.0))
    table = create_method("svd").layer_table(mobile)
    left = [r for r in table if "left_alone" in r]
    assert len(left) == 17 and left[0]["left_alone"].startswith("depthwise")
    assert all(isinstance(mobile.get_submodule(r["layer"]), nn.Conv2d) for r in left)


def test_freq_lowrank_compresses_pointwise_convs_when_spatial_ones_cannot_reach():
    with pytest.raises(MethodConfigError, match="out of reach") as info:
        compress("freq_lowrank", dense("mobilenetv2_050"), Target(ratio=2.0), layers="spatial")
    message = str(info.value)
    assert "1 x 1 convs" in message and "depthwise convs" in message and "\n" not in message
    out = compress("freq_lowrank", dense("mobilenetv2_050"), Target(ratio=2.0), layers="auto")
    ranks = {r["layer"] for r in create_method("freq_lowrank").layer_table(out) if "rank" in r}
    assert "blocks.1.0.conv_pw" in ranks  # a 1 x 1 conv


@pytest.mark.parametrize(
    ("method", "limit"),
    [("l1_filter", "convs feeding residual sums"), ("svd", "17 depthwise convs")],
)
def test_out_of_reach_says_which_layers_keep_the_params(method, limit):
    with pytest.raises(MethodConfigError, match="out of reach") as info:
        compress(method, dense("mobilenetv2_050"), Target(ratio=1000.0))
    message = str(info.value)
    assert limit in message and "% of the params left" in message and "\n" not in message
