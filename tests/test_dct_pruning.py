"""DCTPruning (methods.dct_pruning): the DCT-energy criterion, its hooks, the paper's VGG-16 run.

Ratio targets, determinism, wrong-length rates and residual nets are covered for every structured
method in ``test_structured.py``.
"""

import copy

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

import bench.models
from bench.footprint import count_macs
from methods._dct import idct2
from methods._modules import example_input
from methods._structured import PrunableModel, build_graph, prunable_convs
from methods.base import (
    CalibData,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
    parse_layer_rates,
)
from methods.dct_pruning import dct_band_energy

SHAPE = (3, 12, 12)


def vgg_like(batchnorm: bool = True) -> nn.Sequential:
    """conv(3->8)[-BN]-ReLU, conv(8->12)[-BN]-ReLU, pool, conv(12->16)-ReLU, pool, linear."""
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(cout)] if batchnorm else []
        return [nn.Conv2d(cin, cout, 3, padding=1), *norm, nn.ReLU()]

    model = nn.Sequential(
        *block(3, 8),
        *block(8, 12),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def data(n_batches: int = 4) -> CalibData:
    return CalibData.synthetic(SHAPE, 10, n_batches=n_batches, batch_size=6)


def scores(model: nn.Module, calib: CalibData, **hp) -> list[torch.Tensor]:
    example = example_input(model, SHAPE)
    graph = build_graph(model, example)
    layers = prunable_convs(model, example, graph=graph)
    prunable = PrunableModel(model, layers, calib, graph)
    return create_method("dct_pruning", **hp).filter_scores(prunable)


def post_relu_maps(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the ReLUs that follow the two prunable convs, by running the layers by hand."""
    maps = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, nn.ReLU) and len(maps) < 2:
                maps.append(x.clone())
    return maps


# ---------------------------------------------------------------------------------- criterion
def test_full_band_energy_is_the_activation_energy_parseval():
    maps = torch.relu(torch.randn(5, 4, 9, 7))
    energy = dct_band_energy(maps, "full", 0.5)
    expected = maps.double().square().sum(dim=(0, 2, 3))
    torch.testing.assert_close(energy, expected, rtol=1e-5, atol=0)


def test_low_band_energy_sums_the_top_left_block_of_scipy_coefficients():
    maps = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    coeffs = scipy.fft.dctn(maps.numpy(), type=2, norm="ortho", axes=(-2, -1))
    expected = (coeffs[:, :, :4, :3] ** 2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(dct_band_energy(maps, "low", 0.5).numpy(), expected, rtol=1e-10)
    # a quarter block (ceil(0.25 * 8) x ceil(0.25 * 6) = 2 x 2)
    expected = (coeffs[:, :, :2, :2] ** 2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(dct_band_energy(maps, "low", 0.25).numpy(), expected, rtol=1e-10)


def test_low_band_prefers_smooth_maps_full_band_prefers_energetic_ones():
    coeffs = torch.zeros(2, 8, 8, dtype=torch.float64)
    coeffs[0, 7, 6] = 3.0  # a high-frequency map with energy 9
    coeffs[1, 0, 0] = 1.0  # a constant map with energy 1
    maps = idct2(coeffs)[None]  # 1 x 2 x 8 x 8
    full = dct_band_energy(maps, "full", 0.5)
    low = dct_band_energy(maps, "low", 0.5)
    torch.testing.assert_close(full, torch.tensor([9.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(low, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_scores_are_post_bn_relu_energy_averaged_over_images():
    model = vgg_like()
    calib = data()
    got = scores(model, calib, calib_batches=3)
    totals = [torch.zeros(8, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)]
    for x, _ in calib.take(3):
        for i, a in enumerate(post_relu_maps(model, x)):
            totals[i] += a.double().square().sum(dim=(0, 2, 3))
    assert [len(s) for s in got] == [8, 12]
    for s, total in zip(got, totals):
        torch.testing.assert_close(s, total / 18, rtol=1e-5, atol=0)
    # the hook is after BN + ReLU, not on the raw conv output
    x = calib.take(1)[0][0]
    raw = torch.relu(model[0](x)).double().square().sum(dim=(0, 2, 3))
    assert not torch.allclose(raw, totals[0], rtol=1e-3)


def test_conv_relu_without_batchnorm_falls_back_to_the_conv_output():
    model = vgg_like(batchnorm=False)
    calib = data(1)
    got = scores(model, calib, calib_batches=1)
    x = calib.take(1)[0][0]
    for s, a in zip(got, post_relu_maps(model, x)):
        torch.testing.assert_close(s, a.double().square().sum(dim=(0, 2, 3)) / 6, rtol=1e-5, atol=0)


def test_only_the_first_calib_batches_are_used():
    model = vgg_like()
    two_of_four = scores(model, data(4), calib_batches=2)
    only_two = scores(model, data(2), calib_batches=5)  # fewer batches than asked: all of them
    four = scores(model, data(4), calib_batches=4)
    for a, b, c in zip(two_of_four, only_two, four):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)


def test_model_mode_is_restored_after_scoring():
    model = vgg_like().train()
    scores(model, data(1), calib_batches=1)
    assert model.training


# ------------------------------------------------------------------------------------- method
@pytest.mark.parametrize(
    ("hp", "match"),
    [
        ({"band": "mid"}, "band='mid' must be one of 'full', 'low'"),
        ({"band_fraction": 0.0}, r"band_fraction=0.0 must be a number in \(0, 1\]"),
        ({"band_fraction": 1.5}, r"band_fraction=1.5 must be a number in \(0, 1\]"),
        ({"band_fraction": "half"}, "band_fraction='half' must be a number"),
        ({"calib_batches": 0}, "calib_batches=0 must be an integer >= 1"),
        ({"calib_batches": 2.5}, "calib_batches=2.5 must be an integer"),
        ({"allocation": "greedy"}, "allocation='greedy' must be one of 'uniform', 'global'"),
        ({"reinit_bn": "yes"}, "reinit_bn='yes' must be True or False"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(hp, match):
    with pytest.raises(MethodConfigError, match=match) as info:
        create_method("dct_pruning", **hp)
    assert "\n" not in str(info.value) and str(info.value).startswith("dct_pruning: ")


def test_hyperparameters_round_trip_and_defaults_are_the_released_recipe():
    method = create_method("dct_pruning")
    assert method.hyperparameters() == {
        "band": "full",
        "band_fraction": 0.5,
        "calib_batches": 5,
        "allocation": "uniform",
        "reinit_bn": False,
    }
    again = create_method(
        "dct_pruning", **create_method("dct_pruning", band="low").hyperparameters()
    )
    assert again.band == "low"


@pytest.mark.parametrize("reinit_bn", [False, True])
def test_reinit_bn_resets_bn_and_classifier_only_when_asked(reinit_bn):
    model = vgg_like()
    reference = copy.deepcopy(model)
    method = create_method("dct_pruning", reinit_bn=reinit_bn, calib_batches=1)
    out = method.compress(model, Target(layer_rates=(0.5, 0.5)), data(1), no_finetune())
    bn = out[1]
    assert bn.num_features == 4
    if reinit_bn:
        assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(
            bn.running_mean, torch.zeros(4)
        )
        assert not torch.equal(out[-1].weight, reference[-1].weight)
    else:
        kept = [i for i in range(8) if torch.isin(reference[0].bias[i], out[0].bias)]
        torch.testing.assert_close(bn.running_mean, reference[1].running_mean[kept])
        assert torch.equal(out[-1].weight, reference[-1].weight)


@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_low_band_global_allocation_meets_ratio(ratio):
    model = bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=0.125)
    model.eval()
    n_dense = count_params(model)
    calib = CalibData.synthetic((3, 16, 16), 10, n_batches=1, batch_size=4)
    method = create_method("dct_pruning", band="low", allocation="global", calib_batches=1)
    out = method.compress(model, Target(ratio=ratio), calib, no_finetune())
    assert abs(n_dense / count_params(out) / ratio - 1) <= 0.02
    assert out(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_paper_vgg16_rates_keep_the_papers_filter_counts():
    """DCTPruning's VGG-16 run ``[0.5]*7+[0.95]*5`` at full width, 32 x 32, 10 classes."""
    model = bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=1.0)
    model.eval()
    dense_params, dense_macs = count_params(model), count_macs(model, (3, 32, 32))
    calib = CalibData.synthetic((3, 32, 32), 10, n_batches=1, batch_size=2)
    method = create_method("dct_pruning", calib_batches=1)
    target = Target(layer_rates=parse_layer_rates("[0.5]*7+[0.95]*5"))
    out = method.compress(model, target, calib, no_finetune())
    widths = [m.out_channels for m in out.features if isinstance(m, nn.Conv2d)]
    assert widths == [32, 32, 64, 64, 128, 128, 128, 26, 26, 26, 26, 26, 512]
    assert [r["filters_after"] for r in method.layer_table(out)] == widths[:12]
    # measured: params 14.99M -> 0.881M (-94.13 %), MACs 313.5M -> 49.5M (-84.20 %);
    # the paper reports -94.2 % and -84.1 %
    assert 1 - count_params(out) / dense_params == pytest.approx(0.9413, abs=5e-4)
    assert 1 - count_macs(out, (3, 32, 32)) / dense_macs == pytest.approx(0.8420, abs=5e-4)
