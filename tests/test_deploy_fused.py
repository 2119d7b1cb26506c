"""BatchNorm folding and the factorised pairs' deployed forms (bench.deploy.fused)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bench.models
from bench.deploy import Timing, deploy
from bench.deploy.fused import fold_batchnorm, pad_rank, recompose
from bench.footprint import layer_table
from methods._lowrank import LowRank, build_lowrank, truncated_svd, weight_matrix
from methods.base import CalibData, Target, count_params, create_method, no_finetune

SHAPE = (3, 32, 32)


def _perturbed(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults, so a fold matters."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("vgg16_bn_cifar", {"width": 0.25}),
        ("resnet56_cifar", {"width": 0.25}),
        ("mobilenetv2_050", {}),  # timm BatchNormAct2d: the activation stays
        ("regnetx_002", {}),
    ],
)
def test_folding_keeps_the_outputs_and_removes_every_batchnorm(name, kw):
    torch.manual_seed(0)
    model = _perturbed(bench.models.create_model(name, num_classes=10, in_chans=3, **kw))
    assert _bns(model) > 0
    x = torch.randn(4, *SHAPE)
    deployed = deploy(model, SHAPE)
    assert deployed.notes == {}
    assert _bns(deployed.model) == 0
    torch.testing.assert_close(deployed.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert _bns(model) > 0, "deploy changed the model it was given"


def test_a_conv_output_used_beside_its_batchnorm_is_not_folded():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output is used twice

    model = _perturbed(Both())
    x = torch.randn(2, *SHAPE)
    before = model(x)
    notes = fold_batchnorm(model, SHAPE)
    assert "BatchNorm not folded" in notes["model"]
    assert isinstance(model.bn, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), before)


def _pair(rank: int, conv: bool = True) -> LowRank:
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 24, 3, padding=1) if conv else nn.Linear(40, 24)
    a, b = truncated_svd(weight_matrix(layer).double(), rank)
    return build_lowrank(layer, a.float(), b.float()).eval()


@pytest.mark.parametrize("conv", [True, False])
def test_padded_and_recomposed_forms_equal_the_pair_and_count_its_values(conv):
    pair = _pair(5, conv)
    x = torch.randn(3, 16, 8, 8) if conv else torch.randn(3, 40)
    padded = pad_rank(pair)
    assert padded is not None and padded.rank == 5
    assert (padded[0].weight.shape[0]) == 8
    dense = recompose(pair)
    for form in (padded, dense):
        torch.testing.assert_close(form(x), pair(x), rtol=1e-4, atol=1e-5)
        assert form.stored_values() == count_params(pair)
        assert form.stored_bytes() == 4 * count_params(pair)
    # the zeros exist at run time only: params count what is stored
    assert sum(p.numel() for p in padded.parameters()) > count_params(padded)
    assert pad_rank(_pair(8, conv)) is None  # already a multiple of 8


def test_grouped_pair_recomposes_per_group():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    from methods._lowrank import group_matrices, thin_svd

    u, s, vh = thin_svd(group_matrices(layer).double())
    r = 2
    a = (u[:, :, :r] * s[:, :r].sqrt().unsqueeze(1)).float()
    b = (s[:, :r].sqrt().unsqueeze(2) * vh[:, :r]).float()
    pair = build_lowrank(layer, a, b).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(recompose(pair)(x), pair(x), rtol=1e-4, atol=1e-5)
    assert pad_rank(pair) is None  # grouped pairs are not padded


def test_thin_svd_equals_the_wide_svd():
    from methods._lowrank import singular_values, thin_svd

    m = torch.randn(3, 20, 70, dtype=torch.float64)
    u, s, vh = thin_svd(m)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, m)
    torch.testing.assert_close(s, torch.linalg.svdvals(m))
    torch.testing.assert_close(singular_values(m), torch.linalg.svdvals(m))


def test_choices_keep_outputs_and_reach_the_layer_table():
    torch.manual_seed(0)
    dense = _perturbed(
        bench.models.create_model("vgg16_bn_cifar", num_classes=10, in_chans=3, width=0.125)
    )
    data = CalibData.synthetic(SHAPE, 10, n_batches=1, batch_size=8)
    method = create_method("svd")
    compressed = method.compress(copy.deepcopy(dense), Target(ratio=4), data, no_finetune())
    compressed.eval()
    x = torch.randn(4, *SHAPE)
    deployment = deploy(compressed, SHAPE, Timing(batch_size=4, threads=1, min_run_time=0.003))
    pairs = [n for n, m in compressed.named_modules() if isinstance(m, LowRank)]
    assert set(pairs) <= set(deployment.notes)
    for name in pairs:
        assert deployment.notes[name].split(" (")[0] in {
            "factorised",
            "recomposed dense",
        } or deployment.notes[name].startswith("rank padded")
        assert "ms" in deployment.notes[name]
    torch.testing.assert_close(deployment.model(x), compressed(x), rtol=1e-4, atol=1e-4)
    rows = layer_table(compressed, SHAPE, method, deployment.notes)
    noted = [r for r in rows if r.get("deployed")]
    assert {r["layer"].rsplit(".", 1)[0] for r in noted} >= set(pairs)
