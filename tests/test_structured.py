"""Structured filter pruning: the shared plumbing (methods._structured) and the three methods on it.

Models: a small VGG-like net and a two-block residual net with an option-A shortcut, defined here,
plus the harness's ``vgg16_bn_cifar`` and ``resnet20_cifar`` at reduced width.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench.models
import methods
import methods._structured as structured
from bench.footprint import count_macs
from methods._allocation import get_allocation
from methods._modules import example_input
from methods._structured import (
    build_graph,
    kept_count,
    prunable_convs,
    prune_filters,
    reinit_bn_and_classifier,
    removal_order,
    solve_ratio,
    top_filters,
)
from methods.base import (
    CalibData,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
)

STRUCTURED = ["l1_filter", "random", "dct_pruning"]
SHAPE = (3, 16, 16)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyVGG(nn.Module):
    """Four conv-BN-ReLU layers (16, 32, 32, 64 filters), global pool, two linears; ~36k params.

    The head and the late convs are registered before the early ones, so registration order is
    not forward order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.late = nn.Sequential(conv_bn_relu(32, 32), conv_bn_relu(32, 64))
        self.early = nn.Sequential(conv_bn_relu(3, 16), conv_bn_relu(16, 32), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.early(x)).mean(dim=(2, 3)))


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling, zero channels padded on both sides."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout - cin) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, one identity block (16), one downsampling option-A block (16 -> 32), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16, 16, 1)
        self.block2 = Block(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def dense(factory=TinyVGG, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().eval()
    # non-trivial BN statistics, so that copying them matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def calib(shape=SHAPE) -> CalibData:
    return CalibData.synthetic(shape, 10, n_batches=2, batch_size=8)


def compress(name: str, model: nn.Module, target: Target, shape=SHAPE, **hp) -> nn.Module:
    return create_method(name, **hp).compress(model, target, calib(shape), no_finetune())


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------- prunable layers
def test_prunable_convs_in_forward_order_without_the_last_conv():
    model = dense()
    names = [name for name, _ in prunable_convs(model, example_input(model, SHAPE))]
    assert names == ["early.0.0", "early.1.0", "late.0.0"]


def test_prunable_convs_skip_residual_coupled_convs():
    model = dense(TinyResNet)
    assert [n for n, _ in prunable_convs(model, example_input(model, SHAPE))] == [
        "block1.conv1",
        "block2.conv1",
    ]


def test_grouped_convs_are_units_pruned_in_channel_blocks():
    grouped = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    units = structured.prunable_units(grouped, torch.zeros(1, *SHAPE))
    # conv 0 feeds the grouped conv's inputs, conv 2 is grouped: both shrink in 2 blocks of 4
    assert [(u.name, u.channel_groups, u.items) for u in units] == [("0", 2, 4), ("2", 2, 4)]
    assert units[0].channels([1, 3]) == [1, 3, 5, 7]
    torch.testing.assert_close(
        units[0].item_scores(torch.arange(8.0)), torch.tensor([2.0, 3.0, 4.0, 5.0])
    )


def test_prunable_convs_of_the_papers_models():
    vgg = bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=0.25)
    vgg_layers = prunable_convs(vgg, example_input(vgg, (3, 32, 32)))
    convs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n, _ in vgg_layers] == convs[:12]
    resnet = bench.models.create_model("resnet56_cifar", num_classes=10, in_chans=3, width=0.25)
    names = [n for n, _ in prunable_convs(resnet, example_input(resnet, (3, 32, 32)))]
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]


def test_build_graph_restores_training_mode_and_works_under_no_grad():
    model = dense().train()
    with torch.no_grad():
        graph = build_graph(model, example_input(model, SHAPE))
    assert model.training and all(m.training for m in model.modules())
    assert model.early[0][0] in graph.module2node


# ------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize(
    ("n", "rate", "kept"),
    [(64, 0.5, 32), (512, 0.95, 26), (100, 0.7, 30), (10, 0.99, 1), (7, 0.0, 7), (3, 0.5, 2)],
)
def test_kept_count_is_ceil_of_the_kept_share(n, rate, kept):
    assert kept_count(n, rate) == kept


def test_top_filters_keeps_the_highest_scores_with_stable_ties():
    keep = top_filters([torch.tensor([0.1, 0.9, 0.5, 0.9]), torch.tensor([3.0, 1.0])], [2, 1])
    assert keep[0].tolist() == [1, 3]
    assert keep[1].tolist() == [0]
    tied = top_filters([torch.ones(5)], [2])
    assert tied[0].tolist() == [0, 1]


def test_removal_order_uniform_interpolates_rates_and_keeps_one_filter():
    order = removal_order([torch.rand(4), torch.rand(2)], "uniform")
    # filter j of an n-filter layer goes at rate j/n: 1/4, then 2/4 and 1/2 (layer order), then 3/4
    assert order == [0, 0, 1, 0]


def test_removal_order_global_ranks_normalised_scores_across_layers():
    # layer 1's scores are 100x larger, but normalised by their mean they rank below layer 0's
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 100.0, 190.0])]
    # normalised: [0.5, 1.0, 1.5] and [0.1, 1.0, 1.9]; each layer's best stays
    assert removal_order(scores, "global") == [1, 0, 0, 1]
    with pytest.raises(MethodConfigError, match="allocation='x' must be one of 'uniform'"):
        removal_order(scores, "x")
    assert get_allocation("global").removal_keys(scores[1]) == pytest.approx([0.1, 1.0])


# ------------------------------------------------------------------------------------ surgery
def test_prune_filters_keeps_the_chosen_weights_and_fixes_coupled_layers():
    model = dense()
    original = copy.deepcopy(model)
    keep = [torch.tensor([0, 3, 5, 15]), torch.arange(0, 32, 2), torch.tensor([7])]
    names = ["early.0.0", "early.1.0", "late.0.0"]
    prune_filters(model, example_input(model, SHAPE), names, keep)
    c0, bn0, c1 = model.early[0][0], model.early[0][1], model.early[1][0]
    assert [c0.out_channels, c1.out_channels, model.late[0][0].out_channels] == [4, 16, 1]
    torch.testing.assert_close(c0.weight, original.early[0][0].weight[keep[0]])
    torch.testing.assert_close(c0.bias, original.early[0][0].bias[keep[0]])
    torch.testing.assert_close(bn0.running_mean, original.early[0][1].running_mean[keep[0]])
    torch.testing.assert_close(bn0.weight, original.early[0][1].weight[keep[0]])
    expected = original.early[1][0].weight[keep[1]][:, keep[0]]
    torch.testing.assert_close(c1.weight, expected)
    assert model.late[1][0].in_channels == 1


def test_pruning_dead_filters_leaves_the_function_unchanged():
    """Filters whose post-ReLU output is always zero can go without changing any output."""
    model = dense()
    drop = [2, 5, 11]
    with torch.no_grad():
        model.early[0][1].bias[drop] = -1e4  # BN output << 0, so ReLU gives exactly zero
    keep = [i for i in range(16) if i not in drop]
    x = torch.randn(4, *SHAPE)
    before = model(x)
    prune_filters(model, example_input(model, SHAPE), ["early.0.0"], [keep])
    assert model.early[1][0].in_channels == 13
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_reinit_bn_and_classifier_resets_bn_and_linears():
    model = dense()
    conv_before = model.early[0][0].weight.clone()
    linear_before = model.head[0].weight.clone()
    reinit_bn_and_classifier(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
    assert not torch.equal(model.head[0].weight, linear_before)
    assert torch.equal(model.early[0][0].weight, conv_before)


# ------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("ratio", [2.0, 4.0])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_ratio_target_met_and_model_really_smaller(name, allocation, ratio):
    model = dense()
    reference = copy.deepcopy(model)
    out = compress(name, model, Target(ratio=ratio), allocation=allocation)
    achieved = count_params(reference) / count_params(out)
    assert abs(achieved / ratio - 1) <= 0.02, achieved
    x = torch.randn(3, *SHAPE)
    y = out.eval()(x)
    assert y.shape == reference(x).shape == (3, 10)
    assert torch.isfinite(y).all()
    widths = conv_widths(out)
    assert sum(widths) < sum(conv_widths(reference))
    assert out.late[1][0].out_channels == 64  # the last conv is kept whole
    assert count_macs(out, SHAPE) < count_macs(reference, SHAPE)


@pytest.mark.parametrize("name", STRUCTURED)
def test_layer_rates_give_the_exact_filter_counts_and_table(name):
    method = create_method(name)
    out = method.compress(dense(), Target(layer_rates=(0.5, 0.25, 0.9)), calib(), no_finetune())
    assert [out.early[0][0].out_channels, out.early[1][0].out_channels] == [8, 24]
    assert out.late[0][0].out_channels == 4  # ceil(32 * 0.1)
    rows = method.layer_table(out)
    assert [(r["layer"], r["filters_before"], r["filters_after"]) for r in rows] == [
        ("early.0.0", 16, 8),
        ("early.1.0", 32, 24),
        ("late.0.0", 32, 4),
    ]
    assert rows[0]["pruned_fraction"] == 0.5
    # the table is read from the model: a fresh instance on a copy gives the same rows
    assert create_method(name).layer_table(copy.deepcopy(out)) == rows
    assert create_method(name).layer_table(dense()) == []


@pytest.mark.parametrize("name", STRUCTURED)
def test_layer_rates_of_the_wrong_length_are_rejected(name):
    with pytest.raises(MethodConfigError, match="2 layer rates given but the model has 3"):
        compress(name, dense(), Target(layer_rates=(0.5, 0.5)))


@pytest.mark.parametrize("name", STRUCTURED)
def test_bad_hyperparameters_are_rejected_in_one_line(name):
    expected = f"{name}: allocation='layerwise' must be one of 'uniform', 'global'"
    with pytest.raises(MethodConfigError, match=expected) as info:
        create_method(name, allocation="layerwise")
    assert "\n" not in str(info.value)
    with pytest.raises(MethodConfigError, match="has no hyperparameter 'rate'"):
        create_method(name, rate=0.5)


@pytest.mark.parametrize("name", STRUCTURED)
def test_ratio_out_of_reach_is_a_one_line_error(name):
    with pytest.raises(MethodConfigError, match=f"ratio 50 is out of reach for {name}") as info:
        compress(name, dense(), Target(ratio=50))
    assert "reaches at most" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", STRUCTURED)
def test_deterministic_under_manual_seed(name):
    outs = []
    for _ in range(2):
        model = dense()
        torch.manual_seed(11)
        outs.append(compress(name, model, Target(ratio=3.0)).state_dict())
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_random_depends_on_the_seed_and_l1_keeps_the_largest_norms():
    kept = []
    for seed in (0, 1):
        model = dense()
        torch.manual_seed(seed)
        out = compress("random", model, Target(layer_rates=(0.5, 0.5, 0.5)))
        kept.append(out.early[1][0].bias.clone())
    assert not torch.equal(kept[0], kept[1])
    model = dense()
    norms = model.early[1][0].weight.abs().sum(dim=(1, 2, 3))
    expected = model.early[1][0].bias[norms.argsort(descending=True)[:16].sort().values].clone()
    out = compress("l1_filter", model, Target(layer_rates=(0.0, 0.5, 0.0)))
    torch.testing.assert_close(out.early[1][0].bias, expected)


@pytest.mark.parametrize("name", STRUCTURED)
def test_residual_aware_pruning_on_resnet20(name):
    model = bench.models.create_model("resnet20_cifar", num_classes=10, in_chans=3, width=0.5)
    model.eval()
    reference = copy.deepcopy(model)
    shape = (3, 32, 32)
    out = compress(name, model, Target(ratio=2.0), shape=shape)
    assert abs(count_params(reference) / count_params(out) / 2.0 - 1) <= 0.02
    # the residual stream (stem, every block's second conv) keeps its width; first convs shrink
    assert out.conv1.out_channels == 8
    for stage, width in ((out.layer1, 8), (out.layer2, 16), (out.layer3, 32)):
        for block in stage:
            assert block.conv2.out_channels == width
            assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
    assert sum(b.conv1.out_channels for s in (out.layer1, out.layer2, out.layer3) for b in s) < 168
    # the pruned model still trains
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(out(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert out.eval()(x).shape == (4, 10)


def test_own_residual_net_with_a_pad_shortcut():
    model = dense(TinyResNet)
    out = compress("l1_filter", model, Target(layer_rates=(0.5, 0.75)))
    assert [out.block1.conv1.out_channels, out.block2.conv1.out_channels] == [8, 8]
    assert out(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_methods_are_registered_with_their_families():
    assert {"l1_filter", "random", "dct_pruning"} <= set(methods.list_methods())
    assert methods.get_method_class("random").family == "spatial"
    assert methods.get_method_class("dct_pruning").family == "frequency"
    assert all(methods.get_method_class(n).structured for n in STRUCTURED)


def _fake_params(counts):
    """Parameter arithmetic standing in for real surgery: a wide layer 0, a cheap layer 1."""
    return 1000 * counts[0] + 30 * counts[1] + 100


def test_solve_ratio_nudges_one_filter_when_the_bisection_step_is_too_coarse(monkeypatch):
    monkeypatch.setattr(structured, "build_graph", lambda model, example: None)
    model = nn.Linear(2399, 1)  # 2400 dense params = 1000 * 2 + 30 * 10 + 100
    scores = [torch.rand(2), torch.rand(10)]
    how = {
        "allocation": "uniform",
        "method": "x",
        "params_of": _fake_params,
    }
    # the removal path jumps from (2, 6) = 2280 params to (1, 6) = 1280; 1310 needs (1, 7)
    counts = solve_ratio(model, None, ["a", "b"], scores, Target(ratio=2400 / 1310), **how)
    assert counts == [1, 7]
    with pytest.raises(MethodConfigError, match="cannot be met within 2% by x") as info:
        solve_ratio(model, None, ["a", "b"], scores, Target(ratio=1.5), **how)
    assert "\n" not in str(info.value)
