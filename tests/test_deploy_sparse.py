"""Sparse deployment (``bench.deploy.sparse``) and the nnz-aware units: macs_nz, model_bytes."""

import copy

import pytest
import torch
from conftest import fresh_vgg
from torch import nn

from bench import footprint
from bench.deploy import Timing, deploy
from bench.deploy import sparse as sp
from bench.testing import compress_quietly
from methods._masks import apply_mask
from methods.base import CalibData, Target, count_params, create_method
from methods.lrsd import LowRankSparse

DATA = CalibData.synthetic((3, 16, 16), 10, n_batches=2, batch_size=16)
TIMING = Timing(batch_size=4, threads=1, min_run_time=0.001)


def _mask_exactly(layer: nn.Module, zeros: int, seed: int = 0) -> int:
    """Mask ``zeros`` weights of ``layer`` (a fixed 0/1 mask); returns the nonzeros left."""
    n = layer.weight.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n)
    mask[order[:zeros]] = 0
    apply_mask(layer, mask.reshape(layer.weight.shape))
    return n - zeros


def _forced(monkeypatch, winner: str) -> None:
    """Make the per-layer timing deterministic: ``winner`` ("sparse" or "dense") is faster."""

    def fake(forms, x, min_run_time, device):
        return {
            label: (1.0 if (label == "dense") == (winner == "dense") else 2.0) for label in forms
        }

    monkeypatch.setattr(sp, "_time_interleaved", fake)
    # factorised pairs (lrsd's low-rank branches) stay factorised: bench.deploy.fused's timing
    monkeypatch.setattr(
        "bench.deploy.timing.time_interleaved",
        lambda forms, x, timing: {label: 1.0 if label == "factorised" else 2.0 for label in forms},
    )


# ------------------------------------------------------------------------------------ units
def test_macs_nz_of_a_known_sparsity_layer_is_the_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    conv_nnz = _mask_exactly(model[0], 200)
    fc_nnz = _mask_exactly(model[2], 1000)
    shape = (4, 6, 6)
    dense_macs = 8 * 4 * 9 * 36 + 5 * 288
    assert footprint.count_macs(model, shape) == dense_macs  # masked weights: dense MACs
    assert footprint.count_macs_nz(model, shape) == conv_nnz * 36 + fc_nnz
    baked = deploy(model).model  # the zeros of a baked (plain) weight count the same
    assert footprint.count_macs_nz(baked, shape) == conv_nnz * 36 + fc_nnz
    rows = {r["layer"]: r for r in footprint.layer_table(model, shape)}
    assert rows["0"]["macs_nz"] == conv_nnz * 36 and rows["2"]["macs_nz"] == fc_nnz


def test_a_sparse_layer_counts_nnz_times_output_positions():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.8] = 0
    nnz = int(torch.count_nonzero(conv.weight))
    for layout in sp.SparseConv2d.LAYOUTS:
        sparse = sp.SparseConv2d(conv, layout)
        # 7 x 7 input, stride 2: 4 x 4 output positions
        assert footprint.count_macs(sparse, (4, 7, 7)) == nnz * 16
        assert footprint.count_macs_nz(sparse, (4, 7, 7)) == nnz * 16
    linear = nn.Linear(30, 6)
    with torch.no_grad():
        linear.weight[:, ::3] = 0
    assert footprint.count_macs(sp.SparseLinear(linear), (30,)) == 6 * 20


@pytest.mark.parametrize("layout", sp.SparseConv2d.LAYOUTS)
@pytest.mark.parametrize(
    "kw", [{"padding": 1}, {"stride": 2, "bias": False}, {"padding": 2, "dilation": 2}]
)
def test_sparse_conv_equals_the_dense_conv_and_stores_only_nonzeros(layout, kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, **kw).eval()
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.9] = 0
    sparse = sp.SparseConv2d(conv, layout)
    x = torch.randn(3, 6, 9, 9)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse(cl), conv(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.dense_equivalent()(x), conv(x))
    nnz = int(torch.count_nonzero(conv.weight))
    bias = 10 if conv.bias is not None else 0
    assert sparse.stored_values() == count_params(sparse) == nnz + bias
    # values (float32) + column indices (int32) + row pointers (int32, rows + 1) + bias
    assert (
        sparse.stored_bytes()
        == footprint.model_bytes(sparse)
        == 4 * nnz + 4 * nnz + 4 * 11 + 4 * bias
    )


def test_model_bytes_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model = model.to(torch.float32)
    model[3].to(torch.float64)
    # conv 4*3*9 + 4 floats; BN weight, bias, running mean, running var (num_batches_tracked not)
    want = 4 * (108 + 4) + 4 * 4 * 4 + 8 * (32 + 2)
    assert footprint.model_bytes(model) == want


# ------------------------------------------------------------------------------- deployment
def _magnitude() -> nn.Module:
    model = fresh_vgg(width=0.125)
    return compress_quietly(create_method("magnitude"), model, Target(ratio=16.0), DATA).eval()


def _lrsd() -> nn.Module:
    method = create_method("lrsd", n_samples=32, solver_iters=2, sparse_share=0.5)
    return compress_quietly(method, fresh_vgg(width=0.125), Target(ratio=4.0), DATA).eval()


@pytest.mark.parametrize("build", [_magnitude, _lrsd], ids=["magnitude", "lrsd"])
def test_sparse_deployment_equals_the_masked_model(monkeypatch, build):
    torch.manual_seed(0)
    masked = build()
    _forced(monkeypatch, "sparse")
    deployment = deploy(masked, (3, 16, 16), TIMING)
    model = deployment.model
    chosen = {n: m for n, m in model.named_modules() if sp.is_sparse_module(m)}
    assert chosen and set(chosen) <= set(deployment.notes)
    assert all(deployment.notes[n].startswith("sparse CSR") for n in chosen)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-4)
    if build is _lrsd:  # the S branches went sparse, the low-rank branches stayed
        assert {n.rsplit(".", 1)[-1] for n in chosen} == {"sparse"}
        assert any(isinstance(m, LowRankSparse) for m in model.modules())
    # params of the deployed model count the stored values of its sparse layers: the same model
    # deployed without choices (BatchNorm folded alike) minus the zeros those layers dropped
    ref = deploy(masked, (3, 16, 16)).model
    dropped = sum(
        ref.get_submodule(n).weight.numel() - int(torch.count_nonzero(ref.get_submodule(n).weight))
        for n in chosen
    )
    assert count_params(model) == count_params(ref) - dropped
    fp = footprint.measure(masked, (3, 16, 16), latency=False, deployment=deployment)
    # the same nonzeros touched; executed MACs drop to them for the layers that went sparse
    assert fp.macs_nz == footprint.count_macs_nz(masked, (3, 16, 16))
    assert fp.macs_nz <= fp.macs < footprint.count_macs(masked, (3, 16, 16))
    assert fp.model_bytes < footprint.measure(masked, (3, 16, 16), latency=False).model_bytes
    assert "sparse:" in fp.deployed
    # a second deployment keeps the choices and times nothing again
    again = deploy(model, (3, 16, 16), TIMING)
    assert not set(again.notes) & set(chosen) and sum(
        map(sp.is_sparse_module, again.model.modules())
    ) == len(chosen)


def test_dense_is_kept_where_it_is_faster(monkeypatch):
    masked = _magnitude()
    _forced(monkeypatch, "dense")
    deployment = deploy(masked, (3, 16, 16), TIMING)
    timed = {k: n for k, n in deployment.notes.items() if "too dense" not in n}
    assert timed and all(n.startswith("dense: faster than") for n in timed.values())
    assert not any(sp.is_sparse_module(m) for m in deployment.model.modules())
    assert sp.describe(deployment.model).startswith("masked dense: ")
    again = deploy(deployment.model, (3, 16, 16), TIMING).notes  # the choices stick
    assert not set(again) & set(timed)


def test_without_timing_nothing_is_chosen():
    masked = _magnitude()
    deployment = deploy(masked, (3, 16, 16))
    assert deployment.notes == {}
    assert not any(sp.is_sparse_module(m) for m in deployment.model.modules())


def test_real_timing_picks_a_form_that_matches():
    # no forcing: whichever form wins here, the outputs still match and every candidate has a note
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 4)
    )
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.weight[torch.rand_like(layer.weight) < 0.97] = 0
    deployment = deploy(model, (16, 8, 8), TIMING)
    assert set(deployment.notes) == {"0", "3"}
    assert all(" ms" in note for note in deployment.notes.values())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deployment.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_describe_says_what_was_deployed():
    structured = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert sp.describe(structured) == "structured"
    masked = copy.deepcopy(structured)
    with torch.no_grad():
        masked[0].weight[:2] = 0
    assert sp.describe(masked) == "masked dense: 1 layers"
    mixed = nn.Sequential(copy.deepcopy(masked[0]), sp.SparseConv2d(masked[0]))
    assert sp.describe(mixed) == "masked dense: 1 layers; sparse: 1 layers"
