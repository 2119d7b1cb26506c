"""``freq_lowrank``: DCT-domain sparse training, sampled low-rank rounds, deployment on factors."""

import copy
import warnings

import numpy as np
import pytest
import scipy.fft
import torch
from conftest import fresh_vgg
from torch import nn

from bench.testing import compress_quietly
from methods._dct import idct2
from methods._lowrank import LowRank, build_lowrank, factorisable_layers
from methods.base import (
    CalibData,
    CompressionWarning,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
)
from methods.freq_lowrank import (
    SAMPLERS,
    FreqLowRank,
    dct_coefficients,
    low_rank_factors,
    parametrize_dct,
    remove_dct,
)

DATA = CalibData.synthetic((3, 16, 16), 10, n_batches=1, batch_size=8)


_vgg = fresh_vgg  # a fresh copy of one seeded width-0.25 VGG-16-BN


def _spatial_names(model: nn.Module) -> list[str]:
    return [layer.name for layer in factorisable_layers(model, spatial_only=True)]


def _compress(model, target, finetune=None, **hyper):
    return compress_quietly(create_method("freq_lowrank", **hyper), model, target, DATA, finetune)


def test_dct_parametrisation_is_exact_and_trains_the_coefficients():
    dense = _vgg()
    model = copy.deepcopy(dense)
    names = _spatial_names(model)
    parametrize_dct(model, names)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    conv = model.get_submodule(names[3])
    weight = dense.get_submodule(names[3]).weight.detach().numpy()
    oracle = scipy.fft.dctn(weight, axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(dct_coefficients(conv).detach().numpy(), oracle, atol=1e-5)
    assert count_params(model) == count_params(dense)  # the coefficients replace the weight
    remove_dct(model)
    assert dct_coefficients(conv) is None
    torch.testing.assert_close(conv.weight, dense.get_submodule(names[3]).weight, atol=1e-6, rtol=0)


def test_regularize_is_a_positive_scalar_with_grad_and_none_on_plain_models():
    model = _vgg()
    method = FreqLowRank(lam=1e-3)
    assert method.regularize(model) is None
    parametrize_dct(model, _spatial_names(model))
    penalty = method.regularize(model)
    assert penalty.dim() == 0 and float(penalty.detach()) > 0 and penalty.requires_grad
    penalty.backward()
    grad = model.features[0].parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    flat = FreqLowRank(lam=1e-3, freq_weight=False).regularize(model)
    assert float(flat.detach()) < float(penalty.detach())  # (1 + u + v) >= 1: every weight goes up


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_ratio_is_met_within_two_percent_for_every_sampler(ratio, sampler):
    dense = _vgg()
    compressed = _compress(copy.deepcopy(dense), Target(ratio=ratio), sampler=sampler)
    assert abs(count_params(dense) / count_params(compressed) / ratio - 1) <= 0.02
    assert not any(dct_coefficients(m) is not None for m in compressed.modules())
    assert any(isinstance(m, LowRank) for m in compressed.modules())
    with torch.no_grad():
        assert torch.isfinite(compressed(torch.randn(2, 3, 16, 16))).all()


def test_energy_allocation_meets_the_ratio():
    dense = _vgg()
    compressed = _compress(copy.deepcopy(dense), Target(ratio=4.0), allocation="energy")
    assert abs(count_params(dense) / count_params(compressed) / 4.0 - 1) <= 0.02


def test_rounds_are_logged_and_land_on_the_target():
    finetune = no_finetune()
    dense = _vgg()
    method_args = {"gamma": 0.7, "start_fraction": 0.9, "sparsify_epochs": 1.5}
    compressed = _compress(copy.deepcopy(dense), Target(ratio=4.0), finetune, **method_args)
    steps = [step for step, _ in finetune.logged]
    assert steps == list(range(len(steps))) and len(steps) >= 3
    means = [metrics["round_rank_mean"] for _, metrics in finetune.logged]
    assert means == sorted(means, reverse=True) and means[0] > means[-1]
    last = finetune.logged[-1][1]
    assert abs(last["round_params_ratio"] / 4.0 - 1) <= 0.02
    assert last["round_params_ratio"] == count_params(dense) / count_params(compressed)
    assert set(last) == {"round_rank_mean", "round_params_ratio", "round_val_top1"}
    assert finetune.calls == [1.5] + [1.0] * len(steps)  # sparse training, then one per round
    capped = no_finetune()
    _compress(copy.deepcopy(dense), Target(ratio=4.0), capped, max_rounds=1)
    assert len(capped.logged) == 1 and abs(capped.logged[0][1]["round_params_ratio"] / 4 - 1) < 0.02


class _RecordingFinetune:
    """Records whether the sparse-training call got a working regularizer; trains nothing."""

    def __init__(self) -> None:
        self.penalties: list[float] = []
        self.logged: list = []

    def __call__(self, model, epochs, *, regularizer=None) -> float:
        if regularizer is not None:
            self.penalties.append(float(regularizer(model).detach()))
        return 50.0

    def log(self, metrics, step) -> None:
        self.logged.append((step, dict(metrics)))


def test_sparse_training_gets_the_l1_regularizer_and_thresholding_zeroes_small_coefficients():
    finetune = _RecordingFinetune()
    _compress(_vgg(), Target(ratio=2.0), finetune, lam=1e-4)
    assert len(finetune.penalties) == 1 and finetune.penalties[0] > 0
    assert finetune.logged[-1][1]["round_val_top1"] == 50.0
    model = _vgg()
    names = _spatial_names(model)
    parametrize_dct(model, names)
    method = FreqLowRank(threshold=0.2)
    layers = factorisable_layers(remove_dct(copy.deepcopy(model)), spatial_only=True)
    method._hard_threshold(model, layers)
    for name in names:
        f = dct_coefficients(model.get_submodule(name))
        kept = f[f != 0].abs()
        assert kept.min() >= 0.2 * kept.max() and (f == 0).float().mean() > 0.05


def test_deployed_layer_matches_the_recomposed_dense_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    parametrize_dct(nn.Sequential(conv), ["0"])
    m = dct_coefficients(conv).detach().reshape(10, -1)
    rng = np.random.default_rng(0)
    for sampler in SAMPLERS:
        a, b = low_rank_factors(m, 4, sampler, rng)
        deployed = build_lowrank(conv, a, idct2(b.reshape(4, 6, 3, 3)).reshape(4, -1))
        recomposed = nn.Conv2d(6, 10, 3, padding=1)
        with torch.no_grad():
            recomposed.weight.copy_(idct2((a @ b).reshape(10, 6, 3, 3)))
            recomposed.bias.copy_(conv.bias)
        x = torch.randn(2, 6, 8, 8)
        torch.testing.assert_close(deployed(x), recomposed(x), atol=1e-4, rtol=1e-4)


def test_whole_model_deployment_matches_its_own_factors():
    compressed = _compress(_vgg(), Target(ratio=3.0))
    for module in compressed.modules():
        if isinstance(module, LowRank):
            first, second = module
            dense = nn.Conv2d(first.in_channels, second.out_channels, 3, padding=1)
            product = second.weight.reshape(second.out_channels, -1) @ first.weight.reshape(
                module.rank, -1
            )
            with torch.no_grad():
                dense.weight.copy_(product.reshape(dense.weight.shape))
                dense.bias.copy_(second.bias)
            x = torch.randn(1, first.in_channels, 6, 6)
            torch.testing.assert_close(module(x), dense(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_an_exact_low_rank_matrix(sampler):
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(20, 5, generator=gen) @ torch.randn(5, 45, generator=gen)
    a, b = low_rank_factors(m, 5, sampler, np.random.default_rng(0))
    assert a.shape == (20, 5) and b.shape == (5, 45)
    assert float((a @ b - m).norm() / m.norm()) < 1e-4


def test_sampler_comparison_exact_svd_is_the_floor():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(32, 8, generator=gen) @ torch.randn(8, 96, generator=gen)
    m = m + 0.3 * torch.randn(32, 96, generator=gen)
    errors = {}
    for sampler in SAMPLERS:
        a, b = low_rank_factors(m, 8, sampler, np.random.default_rng(0))
        errors[sampler] = float((a @ b - m).norm() / m.norm())
    assert errors["svd"] <= min(errors["cur"], errors["lineartime"]) + 1e-6
    assert max(errors.values()) < 0.5  # sampled methods still capture the dominant subspace


def test_deterministic_under_a_seed_and_seed_dependent():
    outs = []
    x = torch.randn(2, 3, 16, 16)
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompressionWarning)
            model = create_method("freq_lowrank", sampler="cur").compress(
                _vgg(), Target(ratio=3.0), DATA, no_finetune()
            )
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "bad",
    [
        {"gamma": 1.0},
        {"gamma": 0.0},
        {"sampler": "qr"},
        {"allocation": "greedy"},
        {"max_rounds": 0},
        {"threshold": 1.0},
        {"lam": -1.0},
        {"start_fraction": 0.0},
        {"freq_weight": "yes"},
    ],
)
def test_bad_hyperparameters_raise_one_line_errors(bad):
    with pytest.raises(MethodConfigError) as info:
        create_method("freq_lowrank", **bad)
    assert "\n" not in str(info.value) and str(info.value).startswith("freq_lowrank:")


def test_layer_rates_set_final_ranks_and_clamping_warns():
    rates = Target(layer_rates=(0.999,) + (0.5,) * 12)  # the 13 spatial convs only
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", CompressionWarning)
        compressed = create_method("freq_lowrank").compress(_vgg(), rates, DATA, no_finetune())
    assert compressed.features[0].rank == 1
    assert [str(w.message) for w in record] == [
        "freq_lowrank: rank clamped to 1 in 1 layer(s): features.0"
    ]
    assert compressed.features[3].rank == 8  # half of full rank 16
    with pytest.raises(MethodConfigError, match="13 factorisable layers"):
        _compress(_vgg(), Target(layer_rates=(0.5,) * 15))


def test_model_without_spatial_convs_is_a_config_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(MethodConfigError, match="no conv"):
        _compress(model, Target(ratio=2.0))
