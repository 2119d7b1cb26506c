"""``lrsd``: low-rank + sparse, fit to feature maps by an SVD-free solver; stored params by nnz."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_vgg
from torch import nn

from bench.testing import compress_quietly
from methods._lrsd_solver import greedy_bilateral, input_covariance, reconstruction_error
from methods._masks import masked_weight
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
from methods.lrsd import LowRankSparse

DATA = CalibData.synthetic((3, 16, 16), 10, n_batches=2, batch_size=16)
FAST = {"n_samples": 32, "solver_iters": 2}


def _vgg() -> nn.Module:
    # width 0.125 (8..64 channels): the per-layer solves stay in milliseconds
    return fresh_vgg(width=0.125)


def _compress(model: nn.Module, target: Target, data: CalibData = DATA, **hyper) -> nn.Module:
    return compress_quietly(create_method("lrsd", **{**FAST, **hyper}), model, target, data)


def _decomposed(model: nn.Module) -> dict[str, LowRankSparse]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparse)}


@pytest.mark.parametrize("share", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_stored_ratio_is_met_within_two_percent(ratio, share):
    dense = _vgg()
    compressed = _compress(copy.deepcopy(dense), Target(ratio=ratio), sparse_share=share)
    achieved = count_params(dense) / stored_params(compressed)
    assert abs(achieved / ratio - 1) <= 0.02
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(compressed(x)).all() and compressed(x).shape == (2, 10)


def test_sparse_share_special_cases():
    pure_lowrank = _decomposed(_compress(_vgg(), Target(ratio=3.0), sparse_share=0.0))
    assert pure_lowrank and all(m.sparse is None and m.rank > 0 for m in pure_lowrank.values())
    pure_sparse = _decomposed(_compress(_vgg(), Target(ratio=3.0), sparse_share=1.0))
    assert pure_sparse and all(m.lowrank is None and m.nnz > 0 for m in pure_sparse.values())
    mixed = _decomposed(_compress(_vgg(), Target(ratio=3.0), sparse_share=0.5))
    assert all(m.lowrank is not None and m.sparse is not None for m in mixed.values())


def _refuse_svd(monkeypatch, names=("svd", "svdvals", "eigh", "eig", "eigvalsh")):
    def refuse(*args, **kwargs):
        raise AssertionError("lrsd must not call an SVD")

    for name in names:
        monkeypatch.setattr(torch.linalg, name, refuse)
    for name in ("svd", "svd_lowrank", "pca_lowrank"):
        monkeypatch.setattr(torch, name, refuse)


def test_no_svd_anywhere_while_lrsd_runs(monkeypatch):
    _refuse_svd(monkeypatch)
    compressed = _compress(_vgg(), Target(ratio=2.0), allocation="uniform")
    assert _decomposed(compressed)


def test_energy_allocation_solves_only_small_symmetric_eigenproblems(monkeypatch):
    # the one decomposition "energy" adds: eigenvalues of the m x m output Gram W Sigma W^T
    # per layer, once; the solver itself stays SVD-free
    model = _vgg()
    shapes, eigvalsh = [], torch.linalg.eigvalsh
    _refuse_svd(monkeypatch, names=("svd", "svdvals", "eigh", "eig"))

    def spy(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return eigvalsh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", spy)
    outs = [m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    compressed = _compress(model, Target(ratio=4.0), allocation="energy")
    assert sorted(shapes) == sorted((m, m) for m in outs)
    ranks = {name: m.rank for name, m in _decomposed(compressed).items()}
    assert len(set(ranks.values())) > 2  # the energy spreads ranks unevenly


def test_energy_allocation_beats_uniform_on_trained_like_spectra():
    # layers whose outputs live in a few directions should give up rank to those that do not
    torch.manual_seed(0)
    lin = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    with torch.no_grad():  # layer 0: rank 4 plus noise; layer 1: full rank
        lin[0].weight.copy_(
            torch.randn(256, 4) @ torch.randn(4, 256) + 0.01 * torch.randn(256, 256)
        )
    data = CalibData.synthetic((256,), 10, n_batches=2, batch_size=32)
    ranks = {}
    for allocation in ("uniform", "energy"):
        method = create_method("lrsd", sparse_share=0.0, allocation=allocation, n_samples=64)
        out = method.compress(copy.deepcopy(lin), Target(ratio=2.0), data, no_finetune())
        ranks[allocation] = [m.rank for m in out.modules() if isinstance(m, LowRankSparse)]
    assert ranks["energy"][0] < ranks["uniform"][0]
    assert ranks["energy"][1] > ranks["uniform"][1]


def test_solver_recovers_an_exact_low_rank_plus_sparse_matrix():
    torch.manual_seed(0)
    low = torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 50, dtype=torch.float64)
    sparse = torch.zeros(30, 50, dtype=torch.float64)
    sparse.view(-1)[torch.randperm(1500)[:20]] = 20.0
    w = low + sparse
    u, v, s, mask = greedy_bilateral(w, torch.eye(50, dtype=torch.float64), 4, 20, solver_iters=30)
    assert int(mask.sum()) == 20 and not s[mask == 0].any()
    assert float((w - u @ v - s).norm() / w.norm()) < 1e-6


def test_solver_reaches_the_reduced_rank_regression_optimum_without_sparse_part():
    torch.manual_seed(1)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = (
        torch.randn(40, 400, dtype=torch.float64)
        * torch.linspace(0.1, 3.0, 40).unsqueeze(1).double()
    )
    sigma = x @ x.T / 400
    u, v, s, mask = greedy_bilateral(w, sigma, 6, 0, rank_step=2, solver_iters=10)
    assert int(mask.sum()) == 0 and not s.any()
    # closed form (test oracle only): best rank-6 W Sigma^(1/2), mapped back
    evals, evecs = torch.linalg.eigh(sigma)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    uu, ss, vh = torch.linalg.svd(w @ root)
    optimum = (uu[:, :6] * ss[:6]) @ vh[:6] @ torch.linalg.inv(root)
    ours = reconstruction_error(w, u @ v, sigma)
    assert ours <= reconstruction_error(w, optimum, sigma) * 1.01
    assert ours < reconstruction_error(w, w * 0, sigma)


def test_data_aware_sparse_beats_magnitude_pruning_in_output_error():
    torch.manual_seed(2)
    w = torch.randn(16, 36, dtype=torch.float64)
    x = torch.randn(36, 300, dtype=torch.float64) + 2.0  # correlated, non-centred (post-ReLU like)
    sigma = x @ x.T / 300
    _, _, s, mask = greedy_bilateral(w, sigma, 0, 200, solver_iters=50)
    magnitude = w * (w.abs() >= w.abs().flatten().topk(200).values[-1])
    assert int(mask.sum()) == 200
    assert reconstruction_error(w, s, sigma) < reconstruction_error(w, magnitude, sigma)


def test_deployed_module_matches_the_undeployed_factors():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    data = CalibData.synthetic((8, 9, 9), 10, n_batches=1, batch_size=8)
    model = nn.Sequential(conv)
    compressed = _compress(copy.deepcopy(model), Target(ratio=2.0), data, sparse_share=0.4)
    module = compressed[0]
    assert isinstance(module, LowRankSparse) and module.rank > 0 and module.nnz > 0
    first, second = module.lowrank
    low = second.weight.reshape(12, -1) @ first.weight.reshape(module.rank, -1)
    recomposed = copy.deepcopy(conv)
    with torch.no_grad():
        recomposed.weight.copy_(low.reshape(conv.weight.shape) + module.sparse.weight)
    x = torch.randn(3, 8, 9, 9)
    torch.testing.assert_close(module(x), recomposed(x), atol=1e-4, rtol=1e-4)
    assert count_params(module.sparse) - stored_params(module.sparse) == 12 * 72 - module.nnz


def test_sparse_pattern_and_stored_params_survive_training():
    compressed = _compress(_vgg(), Target(ratio=3.0), sparse_share=0.5)
    before = stored_params(compressed)
    opt = torch.optim.SGD(compressed.parameters(), lr=0.1)
    compressed.train()
    for x, y in DATA.batches():
        opt.zero_grad()
        F.cross_entropy(compressed(x), y).backward()
        opt.step()
    assert stored_params(compressed) == before
    for module in _decomposed(compressed).values():
        mask = masked_weight(module.sparse)
        assert not module.sparse.weight[mask == 0].any()


def test_input_covariance_of_a_linear_layer_is_x_xt_over_n():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    data = CalibData.synthetic((3, 2, 2), 2, n_batches=2, batch_size=5)
    sigma = input_covariance(model, "1", data, n_samples=10)
    x = torch.cat([b for b, _ in data.batches()]).reshape(10, 12).double()
    torch.testing.assert_close(sigma, x.T @ x / 10)


def _trained_net() -> tuple[nn.Module, CalibData, torch.Tensor]:
    """A small conv net trained a few dozen SGD steps on class templates plus noise."""
    torch.manual_seed(0)
    templates = F.interpolate(torch.randn(10, 3, 4, 4), size=12, mode="bilinear")

    def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        return templates[y] + 0.7 * torch.randn(n, 3, 12, 12, generator=gen), y

    def batches():
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            yield sample(32, gen)

    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        x, y = sample(32, gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    held_out, _ = sample(128, torch.Generator().manual_seed(99))
    return net.eval(), CalibData(batches, (3, 12, 12), 10), held_out


def test_lrsd_reconstructs_feature_maps_no_worse_than_svd_at_equal_budget():
    net, data, held_out = _trained_net()
    with torch.no_grad():
        reference = net(held_out)
    errors = {}
    for name, hyper in [("svd", {}), ("lrsd", {"sparse_share": 0.0}), ("lrsd", {})]:
        torch.manual_seed(0)
        method = create_method(name, **hyper)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompressionWarning)
            compressed = method.compress(copy.deepcopy(net), Target(ratio=2.0), data, no_finetune())
        assert abs(count_params(net) / stored_params(compressed) / 2.0 - 1) <= 0.02
        with torch.no_grad():
            out = compressed(held_out)
        errors[f"{name}{hyper}"] = float((out - reference).norm() / reference.norm())
    svd_error = errors["svd{}"]
    assert errors["lrsd{'sparse_share': 0.0}"] <= svd_error
    assert errors["lrsd{}"] <= svd_error


def test_deterministic_under_a_seed():
    a = _compress(_vgg(), Target(ratio=2.0)).state_dict()
    b = _compress(_vgg(), Target(ratio=2.0)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "bad",
    [
        {"sparse_share": 1.5},
        {"sparse_share": -0.1},
        {"rank_step": 0},
        {"n_samples": 0},
        {"power_iters": True},
        {"solver_iters": 2.5},
        {"eps": -1.0},
    ],
)
def test_bad_hyperparameters_raise_one_line_errors(bad):
    with pytest.raises(MethodConfigError) as info:
        create_method("lrsd", **bad)
    assert "\n" not in str(info.value) and str(info.value).startswith("lrsd:")


def test_layer_rates_clamp_with_a_warning_and_check_the_layer_count():
    model = _vgg()
    rates = Target(layer_rates=(0.999,) + (0.5,) * 14)  # 13 convs + 2 linear layers
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", CompressionWarning)
        torch.manual_seed(0)
        compressed = create_method("lrsd", **FAST).compress(model, rates, DATA, no_finetune())
    assert _decomposed(compressed)["features.0"].rank == 1
    assert any("rank clamped to 1 in 1 layer(s): features.0" in str(w.message) for w in record)
    with pytest.raises(MethodConfigError, match="15 factorisable layers"):
        _compress(_vgg(), Target(layer_rates=(0.5,)))


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.spare = nn.Linear(64, 64)  # never called in forward: fitted with Sigma = I
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_unreached_layers_are_still_compressed_and_layer_table_reports_them():
    model = _WithUnusedLayer()
    compressed = _compress(copy.deepcopy(model), Target(ratio=2.0), sparse_share=0.3)
    assert isinstance(compressed.spare, LowRankSparse)
    assert abs(count_params(model) / stored_params(compressed) / 2.0 - 1) <= 0.02
    table = {row["layer"]: row for row in create_method("lrsd").layer_table(compressed)}
    assert table["spare"]["rank"] == compressed.spare.rank > 0
    assert table["spare"]["sparse_nnz"] == compressed.spare.nnz > 0


def test_out_of_reach_ratio_raises():
    with pytest.raises(MethodConfigError, match="out of reach"):
        _compress(_vgg(), Target(ratio=400.0))
