"""Global magnitude pruning (methods.magnitude): exact ratios, one threshold, masks that hold."""

import copy
import math

import pytest
import torch
from torch import nn

from bench.footprint import count_macs
from methods._masks import masked_weight
from methods.base import (
    CalibData,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    no_finetune,
    stored_params,
)
from methods.magnitude import sparsity_fraction

SHAPE = (3, 8, 8)


class Net(nn.Module):
    """conv(3->8)-BN-ReLU, conv(8->16)-ReLU, pool, linear(16->10): 1578 params, 1528 maskable.

    The linear layer is registered first, so module order is not forward order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def dense(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


def data() -> CalibData:
    return CalibData.synthetic(SHAPE, 10, n_batches=2, batch_size=8)


def compress(model: nn.Module, target: Target, finetune=None, **hp):
    method = create_method("magnitude", **hp)
    out = method.compress(model, target, data(), finetune or no_finetune())
    return method, out


def zeroed(module: nn.Module) -> torch.Tensor:
    return masked_weight(module) == 0


class RecordingFinetune:
    """Trains a few SGD steps per call and records every layer's mask at each call."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.masks: list[list[torch.Tensor]] = []
        self.logged: list[tuple[int, dict[str, float]]] = []

    def __call__(self, model, epochs, *, regularizer=None) -> float:
        self.calls.append(epochs)
        self.masks.append([masked_weight(m).clone() for m in (model.conv1, model.conv2, model.fc)])
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        model.train()
        for x, y in data().take(2):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        return 0.0

    def log(self, metrics, step) -> None:
        self.logged.append((step, dict(metrics)))


@pytest.mark.parametrize("ratio", [2.0, 4.0, 10.0])
def test_ratio_target_hits_stored_params(ratio):
    model = dense()
    n_dense = count_params(model)
    _, out = compress(model, Target(ratio=ratio))
    assert stored_params(out) == n_dense - (n_dense - round(n_dense / ratio))
    assert abs(n_dense / stored_params(out) / ratio - 1) <= 0.02
    # unstructured: dense shapes, dense params and dense MACs are unchanged
    assert count_params(out) == n_dense
    assert count_macs(out, SHAPE) == count_macs(dense(), SHAPE)
    y = out(torch.randn(4, *SHAPE))
    assert y.shape == (4, 10) and torch.isfinite(y).all()


def test_one_global_threshold_over_all_conv_and_linear_weights():
    model = dense()
    original = {name: m.weight.detach().abs().clone() for name, m in model.named_children()}
    _, out = compress(model, Target(ratio=3.0))
    gone, kept = [], []
    for name in ("conv1", "conv2", "fc"):
        mask = masked_weight(getattr(out, name)).bool()
        gone.append(original[name][~mask])
        kept.append(original[name][mask])
    assert torch.cat(gone).max() <= torch.cat(kept).min()
    # the layers end up with different sparsities: one threshold, not one rate per layer
    rates = [float(zeroed(getattr(out, n)).float().mean()) for n in ("conv1", "conv2", "fc")]
    assert len({round(r, 3) for r in rates}) > 1


def test_biases_and_batchnorm_stay_dense():
    model = dense()
    reference = copy.deepcopy(model)
    _, out = compress(model, Target(ratio=4.0))
    for name in ("conv1", "conv2", "fc"):
        assert torch.equal(getattr(out, name).bias, getattr(reference, name).bias)
        assert masked_weight(getattr(out, name), "bias") is None
    assert masked_weight(out.bn) is None
    assert torch.equal(out.bn.weight, reference.bn.weight)


def test_masked_outputs_equal_a_model_with_zeroed_weights():
    model = dense()
    reference = copy.deepcopy(model)
    _, out = compress(model, Target(ratio=4.0))
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            getattr(reference, name).weight.mul_(masked_weight(getattr(out, name)))
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(out(x), reference(x))


def test_layer_rates_prune_each_layer_in_forward_order():
    method, out = compress(dense(), Target(layer_rates=(0.1, 0.5, 0.9)))
    sizes = {"conv1": 216, "conv2": 1152, "fc": 160}
    for name, rate in (("conv1", 0.1), ("conv2", 0.5), ("fc", 0.9)):
        assert int(zeroed(getattr(out, name)).sum()) == round(rate * sizes[name])
    rows = method.layer_table(out)
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc"]
    assert [r["kept"] for r in rows] == [194, 576, 16]
    # the table is read from the model: a fresh instance on a copy gives the same rows
    assert create_method("magnitude").layer_table(copy.deepcopy(out)) == rows
    assert create_method("magnitude").layer_table(dense()) == []


def test_layer_rates_of_the_wrong_length_are_rejected():
    with pytest.raises(MethodConfigError, match="2 layer rates given but the model has 3 maskable"):
        compress(dense(), Target(layer_rates=(0.5, 0.5)))


def test_ratio_out_of_reach_is_a_one_line_error():
    reach = 1578 / 50  # only BN and biases would be left
    with pytest.raises(MethodConfigError) as info:
        compress(dense(), Target(ratio=100))
    message = str(info.value)
    assert message.startswith("ratio 100 is out of reach for magnitude on this model")
    assert f"at most {reach:.1f}x" in message and "\n" not in message


@pytest.mark.parametrize(
    "hp",
    [
        {"schedule": "gradual"},
        {"steps": 0},
        {"steps": 2.5},
        {"steps": True},
        {"curve": "quadratic"},
        {"epochs_per_step": -1.0},
        {"epochs_per_step": math.nan},
        {"epochs_per_step": "1"},
    ],
)
def test_bad_hyperparameters_are_rejected(hp):
    with pytest.raises(MethodConfigError) as info:
        create_method("magnitude", **hp)
    assert next(iter(hp)) in str(info.value) and "\n" not in str(info.value)


def test_deterministic_under_manual_seed():
    masks = []
    for _ in range(2):
        torch.manual_seed(5)
        _, out = compress(dense(), Target(ratio=3.0), schedule="iterative", steps=2)
        masks.append([masked_weight(m) for m in (out.conv1, out.conv2, out.fc)])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_masks_survive_sgd_with_momentum_and_weight_decay():
    _, out = compress(dense(), Target(ratio=4.0))
    stored = stored_params(out)
    opt = torch.optim.SGD(out.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    out.train()
    for x, y in data().take(2) * 2:
        loss = nn.functional.cross_entropy(out(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in (out.conv1, out.conv2, out.fc):
        assert torch.all(m.weight[zeroed(m)] == 0)
        assert torch.any(m.weight[~zeroed(m)] != 0)
    assert stored_params(out) == stored


def test_iterative_schedule_finetunes_between_rounds_and_grows_nested_masks():
    finetune = RecordingFinetune()
    model = dense()
    n_dense = count_params(model)
    _, out = compress(
        model, Target(ratio=4.0), finetune, schedule="iterative", steps=3, epochs_per_step=0.5
    )
    assert finetune.calls == [0.5, 0.5]
    assert abs(n_dense / stored_params(out) / 4.0 - 1) <= 0.02
    final = [masked_weight(m) for m in (out.conv1, out.conv2, out.fc)]
    for earlier, later in zip(finetune.masks, [*finetune.masks[1:], final]):
        for a, b in zip(earlier, later):
            assert torch.all(b <= a)  # once zeroed, always zeroed
    sparsities = [metrics["prune_sparsity"] for _, metrics in finetune.logged]
    assert [step for step, _ in finetune.logged] == [1, 2, 3]
    assert sparsities == sorted(sparsities) and sparsities[0] < sparsities[-1]
    # cubic: two thirds of the rounds reach 1 - (1/3)^3 of the final count
    zeroed_final = n_dense - round(n_dense / 4.0)
    assert sparsities[1] * 1528 == pytest.approx(round(zeroed_final * 26 / 27), abs=1)


def test_oneshot_never_finetunes():
    finetune = RecordingFinetune()
    compress(dense(), Target(ratio=2.0), finetune, steps=5)
    assert finetune.calls == []


@pytest.mark.parametrize(
    ("step", "steps", "curve", "share"),
    [
        (1, 3, "cubic", 1 - (2 / 3) ** 3),
        (3, 3, "cubic", 1.0),
        (1, 4, "linear", 0.25),
        (1, 1, "linear", 1.0),
    ],
)
def test_sparsity_fraction_follows_zhu_and_gupta(step, steps, curve, share):
    assert sparsity_fraction(step, steps, curve) == pytest.approx(share)
