"""The CIFAR models: literature footprints, timm registration, width, pruning with torch-pruning."""

import copy
import pickle

import pytest
import timm
import torch
import torch_pruning as tp

import bench.models as bm
from bench.footprint import count_macs
from methods.base import count_params

# Literature figures at 32 x 32, 10 classes: params, MACs (conv + linear multiply-accumulates).
# VGG: HRank / DCTPruning; ResNets: He et al. 2016 as tabulated by HRank and later pruning papers.
LITERATURE = {
    "vgg16_bn_cifar": (14.98e6, 313.73e6),
    "resnet20_cifar": (0.27e6, 40.81e6),
    "resnet56_cifar": (0.85e6, 125.49e6),
    "resnet110_cifar": (1.72e6, 252.89e6),
}


def test_registry_lists_every_cifar_model():
    assert bm.list_cifar_models() == sorted(LITERATURE)
    assert set(LITERATURE) <= set(timm.list_models("*_cifar"))


@pytest.mark.parametrize("name", sorted(LITERATURE))
def test_footprint_matches_the_literature(name):
    params, macs = LITERATURE[name]
    model = timm.create_model(name, num_classes=10)
    # the papers round params to 2 decimals of a million: 1 % covers the rounding
    assert count_params(model) == pytest.approx(params, rel=0.01)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(macs, rel=0.01)


def test_exact_counts_pin_the_architectures():
    # exact values: any change to a layer shows up here, not only beyond the 1 % tolerance
    vgg = bm.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3)
    resnet56 = bm.create_model("resnet56_cifar", num_classes=10, in_chans=3)
    assert (count_params(vgg), count_macs(vgg, (3, 32, 32))) == (14_991_946, 313_463_808)
    assert (count_params(resnet56), count_macs(resnet56, (3, 32, 32))) == (853_018, 125_485_696)


def test_vgg_has_512_features_before_the_classifier():
    model = bm.create_model("vgg16_bn_cifar", num_classes=100, in_chans=3).eval()
    feats = model.pool(model.features(torch.zeros(2, 3, 32, 32)))
    assert feats.shape == (2, 512, 1, 1)
    assert model.get_classifier().out_features == 100


@pytest.mark.parametrize("name", ["vgg16_bn_cifar", "resnet20_cifar"])
def test_fashion_mnist_shaped_input(name):
    model = bm.create_model(name, num_classes=10, in_chans=1, width=0.25).eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vgg16_bn_cifar", "resnet20_cifar"])
def test_width_shrinks_params(name):
    full = count_params(bm.create_model(name, num_classes=10, in_chans=3))
    quarter = count_params(bm.create_model(name, num_classes=10, in_chans=3, width=0.25))
    # conv params scale with width^2: a quarter width is roughly a sixteenth of the params
    assert quarter < full / 10


def test_tiny_width_keeps_at_least_one_channel():
    model = bm.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.01).eval()
    assert model.conv1.out_channels == 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_models_deepcopy_and_pickle():
    model = bm.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x))


def test_option_a_shortcut_is_hranks_zero_padding():
    shortcut = bm.ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    expected = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    torch.testing.assert_close(shortcut(x), expected)
    assert list(shortcut.parameters()) == []
    nhwc = shortcut(x.contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last)


def test_timm_create_model_and_ours_agree():
    a = timm.create_model("resnet20_cifar", num_classes=7, in_chans=1, width=0.5)
    b = bm.create_model("resnet20_cifar", num_classes=7, in_chans=1, width=0.5)
    assert type(a) is type(b) and count_params(a) == count_params(b)


def test_other_timm_models_build_offline_without_weights():
    model = bm.create_model("resnet18", num_classes=10, in_chans=1)
    assert model.conv1.in_channels == 1 and model.get_classifier().out_features == 10


def test_unknown_name_suggests_the_closest():
    with pytest.raises(bm.ModelError, match="did you mean 'resnet56_cifar'") as err:
        bm.create_model("resnet56_cifr", num_classes=10, in_chans=3)
    assert "\n" not in str(err.value)


def test_width_on_a_model_without_one_is_an_error():
    with pytest.raises(bm.ModelError, match="width"):
        bm.create_model("resnet18", num_classes=10, in_chans=3, width=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"pretrained": True}, "no pretrained weights"), ({"width": 0.0}, "width must be > 0"),
     ({"drop_rate": 0.1}, "'drop_rate'")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(bm.ModelError, match=match) as err:
        timm.create_model("vgg16_bn_cifar", **kwargs)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- torch-pruning
def _graph(model, pruners=True):
    custom = {bm.ShortcutA: bm.ShortcutA.tp_pruner()} if pruners else None
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.randn(1, 3, 32, 32), customized_pruners=custom
    )


@pytest.mark.parametrize("pruners", [False, True])
def test_torch_pruning_prunes_a_block_inner_conv(pruners):
    model = bm.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.25).eval()
    graph = _graph(model, pruners)
    block = model.layer2[0]
    before = block.conv1.out_channels
    group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    group.prune()
    assert block.conv1.out_channels == before - 2
    assert block.bn1.num_features == before - 2 and block.conv2.in_channels == before - 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _silence_stream_channel(model, stage, channel):
    """Make residual-stream channel ``channel`` of ``stage`` identically zero (BN scale and shift
    0 wherever the stream is written), so pruning it must leave the outputs unchanged."""
    writers = [model.bn1] if stage == 1 else []  # later stages: the shortcut pads this channel
    writers += [block.bn2 for block in getattr(model, f"layer{stage}")]
    for bn in writers:
        bn.weight.data[channel] = 0.0
        bn.bias.data[channel] = 0.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_residual_stream_pruning_with_the_shortcut_pruner_is_exact(stage):
    torch.manual_seed(0)
    model = bm.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.5).eval()
    _silence_stream_channel(model, stage, channel=1)
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    graph = _graph(model)
    conv = getattr(model, f"layer{stage}")[-1].conv2
    width_before = conv.out_channels
    graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[1]).prune()
    assert conv.out_channels == width_before - 1
    torch.testing.assert_close(model(x), expected)


def test_magnitude_pruner_runs_on_resnet_with_the_shortcut_pruner():
    model = bm.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.5).eval()
    before = count_params(model)
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, 3, 32, 32),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
        customized_pruners={bm.ShortcutA: bm.ShortcutA.tp_pruner()},
    )
    pruner.step()
    assert count_params(model) < before / 2.5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
