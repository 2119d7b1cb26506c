"""Datasets: lookup, splits, batches, augmentation, and one-line errors for missing or bad data."""

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench.data as bd
from bench._splits import random_crop_flip

DEBIAN_FMNIST = bd.FASHION_MNIST_SYSTEM_DIR
needs_debian_fmnist = pytest.mark.skipif(
    not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"no Fashion-MNIST in {DEBIAN_FMNIST} (apt-get install dataset-fashion-mnist)",
)


# ------------------------------------------------------------------------------------- helpers
def write_idx(path: Path, array: np.ndarray, *, gz: bool = True, magic: int | None = None) -> None:
    """Write ``array`` (uint8) in the IDX format that MNIST and Fashion-MNIST use."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 10, gz: bool = True) -> None:
    """Tiny Fashion-MNIST whose image i has every pixel equal to i: images identify themselves."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.ascontiguousarray(images), gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)


def image_ids(split) -> set[int]:
    return set(split.images[:, 0, 0, 0].tolist())


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# -------------------------------------------------------------------------------- dataset facts
def test_dataset_info_needs_no_data():
    imagenet = bd.dataset_info("imagenet")
    assert (imagenet.num_classes, imagenet.input_shape) == (1000, (3, 224, 224))
    assert bd.dataset_info("fashion-mnist").input_shape == (1, 28, 28)
    assert bd.dataset_info("cifar100").num_classes == 100
    assert bd.dataset_info("synthetic").input_shape == (3, 32, 32)
    assert all(len(bd.dataset_info(n).mean) == bd.dataset_info(n).in_chans for n in bd.DATASETS)


@pytest.mark.parametrize(
    ("typo", "meant"), [("fashion_mnist", "fashion-mnist"), ("cifar-10", "cifar10")]
)
def test_unknown_dataset_suggests_the_closest(typo, meant):
    for call in (bd.dataset_info, bd.check_available, bd.load_splits):
        with pytest.raises(bd.DataError) as err:
            call(typo)
        assert_one_line(err, f"did you mean {meant!r}")


# ------------------------------------------------------------------------ Fashion-MNIST (Debian)
@needs_debian_fmnist
def test_fashion_mnist_loads_from_the_debian_package():
    bd.check_available("fashion-mnist", None)
    splits = bd.load_splits("fashion-mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    for split in (splits.train, splits.val, splits.test):
        assert split.images.shape[1:] == (1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 9
    # the official test split is balanced: 1000 images per class
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    # the dataset's mean and std make normalised training images ~zero-mean, unit-variance
    images = torch.cat([x for x, _ in splits.train.batches(8192, shuffle=False, augment=False)])
    assert images.mean().item() == pytest.approx(0.0, abs=0.01)
    assert images.std().item() == pytest.approx(1.0, abs=0.01)


@needs_debian_fmnist
def test_fashion_mnist_subsets():
    splits = bd.load_splits("fashion-mnist", val_size=100, train_subset=300, test_subset=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 100, 50)


# --------------------------------------------------------------------------- Fashion-MNIST (fake)
@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "torchvision"])
def test_fashion_mnist_root_layouts(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    fake_fashion_mnist(folder, gz=layout != "flat-raw")
    bd.check_available("fashion-mnist", tmp_path)
    splits = bd.load_splits("fashion-mnist", tmp_path, val_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (32, 8, 10)
    assert image_ids(splits.test) == set(range(10))


def test_validation_split_is_disjoint_and_stable(tmp_path):
    fake_fashion_mnist(tmp_path)
    a = bd.load_splits("fashion-mnist", tmp_path, val_size=10, split_seed=3)
    b = bd.load_splits("fashion-mnist", tmp_path, val_size=10, split_seed=3)
    c = bd.load_splits("fashion-mnist", tmp_path, val_size=10, split_seed=4)
    train, val = image_ids(a.train), image_ids(a.val)
    assert not train & val and train | val == set(range(40))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert image_ids(c.val) != val
    # a training subset is drawn from the training images only, never from validation
    sub = bd.load_splits("fashion-mnist", tmp_path, val_size=10, split_seed=3, train_subset=5)
    assert image_ids(sub.train) <= train and len(sub.train) == 5 and image_ids(sub.val) == val


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
        (lambda p: write_idx(p.with_suffix(""), np.zeros((3, 28, 28)), magic=0x0801), "magic"),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])), "truncated"),
    ],
)  # fmt: skip
def test_corrupt_fashion_mnist_is_a_one_line_error(tmp_path, corrupt, needle):
    fake_fashion_mnist(tmp_path)
    corrupt(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(bd.DataError) as err:
        bd.load_splits("fashion-mnist", tmp_path, val_size=4)
    assert_one_line(err, needle, "train-images-idx3-ubyte.gz")


def test_missing_fashion_mnist_names_the_places_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(bd, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    for call in (bd.check_available, bd.load_splits):
        with pytest.raises(bd.DataError) as err:
            call("fashion-mnist", tmp_path)
        assert_one_line(err, str(tmp_path), "nowhere", "apt-get install dataset-fashion-mnist")


# -------------------------------------------------------------------------------------- CIFAR
def fake_cifar10(root: Path, monkeypatch) -> tuple[np.ndarray, list[int]]:
    """A 20-image CIFAR-10 in torchvision's on-disk format (3 images per training batch, 5 test);
    torchvision's checksums are pointed at these files. Returns the images (N x 3072) and labels."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)
    labels = [i % 10 for i in range(20)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        rows = slice(3 * i, 3 * i + (3 if i < 5 else 5))  # 3 x 5 training images, then 5 test
        (folder / name).write_bytes(pickle.dumps({"data": data[rows], "labels": labels[rows]}))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    )

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    return data, labels


def test_torchvision_format_cifar10_loads(tmp_path, monkeypatch):
    data, labels = fake_cifar10(tmp_path, monkeypatch)
    bd.check_available("cifar10", tmp_path)
    splits = bd.load_splits("cifar10", tmp_path, val_size=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 5, 5)
    # the official test set in file order: pixels are CHW, labels as written
    expected = torch.from_numpy(data[15:]).reshape(5, 3, 32, 32)
    assert torch.equal(splits.test.images, expected)
    assert splits.test.labels.tolist() == labels[15:]
    x, y = next(splits.train.batches(4, shuffle=True, augment=True))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_corrupt_cifar_is_a_one_line_error(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(bd.DataError) as err:
        bd.load_splits("cifar10", tmp_path)
    assert_one_line(err, "CIFAR-10", "corrupt", "--download")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_says_how_to_get_it(tmp_path, name):
    for call in (bd.check_available, bd.load_splits):
        with pytest.raises(bd.DataError) as err:
            call(name, tmp_path)
        assert_one_line(err, str(tmp_path), "--download", "cifar-")


# ----------------------------------------------------------------------------------- ImageNet
def test_image_folder_splits_stream_batches(tmp_path):
    for split, per_class in (("train", 4), ("val", 1)):
        for cls in ("n01", "n02"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40 + i, 30), (60 * i, 100, 200)).save(folder / f"{i}.png")
    bd.check_available("imagenet", tmp_path)
    splits = bd.load_splits("imagenet", tmp_path, val_size=2, workers=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)
    assert not {p for p, _ in splits.train.samples} & {p for p, _ in splits.val.samples}
    for augment in (False, True):
        batches = list(splits.train.batches(4, shuffle=True, augment=augment, channels_last=True))
        assert [len(y) for _, y in batches] == [4, 2] and splits.train.num_batches(4) == 2
        x, y = batches[0]
        assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_missing_imagenet(tmp_path):
    for root in (None, tmp_path):
        with pytest.raises(bd.DataError) as err:
            bd.check_available("imagenet", root)
        assert_one_line(err, "--data-root")


# ---------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_sized():
    a = bd.load_splits("synthetic", train_subset=64, test_subset=32, val_size=16)
    b = bd.load_splits("synthetic", train_subset=64, test_subset=32, val_size=16)
    assert (len(a.train), len(a.val), len(a.test)) == (64, 16, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    default = bd.load_splits("synthetic")
    assert (len(default.train), len(default.test)) == (2048, 512)


def test_a_linear_model_learns_synthetic_data():
    torch.manual_seed(0)
    splits = bd.load_splits("synthetic", train_subset=1024, test_subset=256)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # ~80 % test accuracy after these two epochs
        for x, y in splits.train.batches(64, shuffle=True, augment=True, generator=gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        correct = sum(
            (model(x).argmax(1) == y).sum().item()
            for x, y in splits.test.batches(256, shuffle=False, augment=False)
        )
    assert correct / len(splits.test) > 0.5  # chance is 0.1


# ------------------------------------------------------------------------ batches and augmentation
@pytest.fixture(scope="module")
def synthetic():
    return bd.load_splits("synthetic", train_subset=100, test_subset=10, val_size=10)


def test_batches_shapes_counts_and_normalisation(synthetic):
    split = synthetic.train
    batches = list(split.batches(32, shuffle=False, augment=False))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4] and split.num_batches(32) == 4
    assert split.num_batches(32, drop_last=True) == 3
    assert len(list(split.batches(32, shuffle=True, augment=False, drop_last=True))) == 3
    x, y = batches[0]
    mean, std = torch.tensor(split.info.mean), torch.tensor(split.info.std)
    expected = (split.images[:32].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, split.labels[:32])
    x_nhwc, _ = next(split.batches(32, shuffle=False, augment=False, channels_last=True))
    assert x_nhwc.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="batch_size"):
        split.num_batches(0)


def test_shuffled_epoch_visits_every_image_once(synthetic):
    labels = torch.cat([y for _, y in synthetic.train.batches(16, shuffle=True, augment=True)])
    assert sorted(labels.tolist()) == sorted(synthetic.train.labels.tolist())


def test_augmentation_keeps_shape_changes_pixels_and_repeats_under_a_seed(synthetic):
    split = synthetic.train

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return [x for x, _ in split.batches(25, shuffle=True, augment=True, generator=gen)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    plain = next(split.batches(25, shuffle=False, augment=False))[0]
    assert a[0].shape == plain.shape
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    augmented = next(split.batches(25, shuffle=False, augment=True))[0]
    assert not torch.equal(augmented, plain)


def crop(image: torch.Tensor, dy: int, dx: int, flip: bool, size: int = 6) -> torch.Tensor:
    out = image[:, dy : dy + size, dx : dx + size]
    return out.flip(-1) if flip else out


def test_random_crop_flip_is_a_crop_of_the_padded_image_or_its_mirror():
    images = torch.randint(0, 256, (16, 2, 6, 6), dtype=torch.uint8)
    pad = 2
    out = random_crop_flip(images, pad, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    seen_offsets, seen_flips = set(), set()
    for image, result in zip(padded, out):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(result, crop(image, dy, dx, flip))
        ]
        assert matches, "an augmented image is not a crop of its padded original"
        seen_offsets.add(matches[0][:2])
        seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 3 and seen_flips == {False, True}
    for result, image in zip(random_crop_flip(images, 0), images):
        assert torch.equal(result, image) or torch.equal(result, image.flip(-1))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"val_size": 40}, "val_size"), ({"val_size": -1}, "val_size"), ({"val_size": 0}, "val_size"),
     ({"train_subset": 31}, "train_subset"), ({"test_subset": 11}, "test_subset"),
     ({"test_subset": 0}, "test_subset")],
)  # fmt: skip
def test_impossible_split_sizes_are_one_line_errors(tmp_path, kwargs, needle):
    fake_fashion_mnist(tmp_path)  # 40 train, 10 test images
    with pytest.raises(bd.DataError) as err:
        bd.load_splits("fashion-mnist", tmp_path, **{"val_size": 10, **kwargs})
    assert_one_line(err, needle)
