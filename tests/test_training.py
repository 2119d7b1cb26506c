"""The training module's BatchNorm re-estimation (the loop itself is covered end to end)."""

import copy

import pytest
import torch
from torch import nn

import bench.data as bd
from bench.study import Recipe
from bench.training import evaluate, recalibrate_bn, train


@pytest.fixture(scope="module")
def synthetic():
    return bd.load_splits("synthetic", train_subset=96, test_subset=8, val_size=8)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6, 5),
        nn.BatchNorm1d(5),
    )


def recalibrate(net, split, *, batches: int, batch_size: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return recalibrate_bn(net, split, batches=batches, batch_size=batch_size, generator=gen)


def test_statistics_are_the_average_over_the_batches_seen(synthetic):
    net = small_net().eval()
    net[1].running_mean.fill_(7.0)  # stale statistics, as after removing filters
    net[1].running_var.fill_(9.0)
    weights = copy.deepcopy(net.state_dict())
    assert recalibrate(net, synthetic.train, batches=3, batch_size=32, seed=1) == 2
    seen = list(
        synthetic.train.batches(
            32, shuffle=True, augment=True, generator=torch.Generator().manual_seed(1)
        )
    )[:3]
    with torch.no_grad():
        feats = [net[0](x) for x, _ in seen]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-4, atol=1e-5)
    # weights untouched, momentum restored, the model back in the mode it was in
    for k, v in net.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, weights[k])
    assert net[1].momentum == 0.1 and not net.training


def test_recalibrated_outputs_ignore_a_rescaled_layer(synthetic):
    # BN(3 conv(x)) with re-estimated statistics is BN(conv(x)): the re-estimation undoes the shift
    # that compression causes, which stale statistics do not
    ref = small_net()
    scaled = copy.deepcopy(ref)
    with torch.no_grad():
        scaled[0].weight.mul_(3)
        scaled[0].bias.mul_(3)
    x = next(synthetic.val.batches(8, shuffle=False, augment=False))[0]
    assert not torch.allclose(ref.eval()(x), scaled.eval()(x), atol=1e-2)
    for net in (ref, scaled):
        recalibrate(net, synthetic.train, batches=2, batch_size=48, seed=0)
    torch.testing.assert_close(ref(x), scaled(x), rtol=1e-3, atol=1e-3)


def test_nothing_to_do_leaves_the_model_as_it_was(synthetic):
    net = small_net()
    net[1].running_mean.fill_(7.0)
    assert recalibrate_bn(net, synthetic.train, batches=0) == 0
    one_image = bd.load_splits("synthetic", train_subset=1, test_subset=1, val_size=1).train
    assert recalibrate_bn(net, one_image, batches=5) == 0  # a 1-image batch has no variance
    assert torch.all(net[1].running_mean == 7.0) and net[1].momentum == 0.1
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    assert recalibrate_bn(plain, synthetic.train, batches=2) == 0


def test_a_split_smaller_than_one_batch_is_refused_not_skipped():
    """Training drops the last partial batch: a split smaller than one batch would train
    nothing, and an empty split would evaluate to 0 %; both raise, saying why."""
    tiny = bd.load_splits("synthetic", train_subset=10, test_subset=1, val_size=1).train
    with pytest.raises(bd.DataError, match="10 images, fewer than one batch of 16"):
        train(small_net(), tiny, Recipe(epochs=1, batch_size=16))
    assert train(small_net(), tiny, Recipe(epochs=0, batch_size=16)) == []  # none asked
    empty = bd.TensorSplit(tiny.images[:0], tiny.labels[:0], tiny.info)
    with pytest.raises(bd.DataError, match="empty split"):
        evaluate(small_net(), empty)
