"""Datasets on disk: whether one is there (:func:`check_available`) and its three splits.

What each dataset is (classes, shape, normalisation) is :mod:`bench.dataset_info`, which reads
nothing; its names are re-exported here.

Small datasets (Fashion-MNIST, CIFAR-10/100, the synthetic one) are held whole in memory as uint8
tensors on the training device; a batch is gathered by index, augmented with batched tensor ops
(random crop of a zero-padded image + horizontal flip, no per-image Python) and normalised
(:class:`bench._splits.TensorSplit`). ImageNet is an ImageFolder streamed through a DataLoader
behind the same ``batches()`` interface (:class:`bench._splits.ImageFolderSplit`).

Splits: ``val`` is carved from the official training set with a fixed-seed permutation
(``split_seed``) and is disjoint from ``train``; ``test`` is the official test set, for final runs
only. ``train_subset``/``test_subset`` keep the first N of a fixed-seed permutation (smoke tests).

Where data is looked for: Fashion-MNIST in ``root`` (flat IDX files, gzipped or not, or
torchvision's ``FashionMNIST/raw/``), then in Debian's ``/usr/share/datasets/fashion-mnist/``;
CIFAR in torchvision's layout under ``root`` (default ``$FREQBENCH_DATA`` or ``./data``); ImageNet
as ``root/train`` and ``root/val``. Every failure is a one-line :class:`DataError`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder

from bench._splits import ImageFolderSplit, TensorSplit
from bench.dataset_info import DATASETS, DataError, DatasetInfo, dataset_info

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "ImageFolderSplit",
    "Splits",
    "TensorSplit",
    "check_available",
    "dataset_info",
    "default_data_root",
    "load_splits",
]

# Debian's dataset-fashion-mnist package; a module attribute so tests can point it elsewhere.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_SYNTHETIC_SEED = 20240917  # the synthetic dataset is one fixed dataset, whatever the split seed


@dataclass(frozen=True)
class Splits:
    """A dataset's three splits: ``train`` and ``val`` (disjoint, both from the training set) and
    ``test`` (the official test set)."""

    info: DatasetInfo
    train: TensorSplit | ImageFolderSplit
    val: TensorSplit | ImageFolderSplit
    test: TensorSplit | ImageFolderSplit


def default_data_root() -> Path:
    """``$FREQBENCH_DATA`` or ``./data``, absolute."""
    return Path(os.environ.get("FREQBENCH_DATA", "data")).expanduser().resolve()


# --------------------------------------------------------------------------------- Fashion-MNIST
def _fashion_mnist_dirs(root: Path | None) -> list[Path]:
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"] if root else []
    return [*dirs, FASHION_MNIST_SYSTEM_DIR]


def _find_fashion_mnist(root: Path | None) -> dict[str, Path]:
    """The four IDX files from the first folder that has all of them."""
    dirs = _fashion_mnist_dirs(root)
    for folder in dirs:
        found = {}
        for key, stem in _FASHION_MNIST_FILES.items():
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is not None:
                found[key] = path
        if len(found) == len(_FASHION_MNIST_FILES):
            return found
    raise DataError(
        f"Fashion-MNIST not found (looked for {_FASHION_MNIST_FILES['train_images']}[.gz] and its "
        f"3 companions in {', '.join(str(d) for d in dirs)}): install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data-root DIR"
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format), gzipped or not, as an array.

    Written here rather than taken from torchvision, whose reader needs uncompressed files and
    fails with a bare ``assert`` on a bad file.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path} ({err}): re-install or re-download it") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= header else -1
    if magic != 0x0800 + ndim:  # 0x08 = unsigned byte, then the number of dimensions
        raise DataError(
            f"{path} is not a {ndim}-d uint8 IDX file (magic {magic:#x}, expected "
            f"{0x0800 + ndim:#x}): re-install or re-download it"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated or corrupt ({len(raw) - header} bytes of data, the header says "
            f"{shape}): re-install or re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _one_line(err: BaseException) -> str:
    """An exception's message with its line breaks folded (torchvision's span several lines)."""
    return " ".join(str(err).split())


def _load_fashion_mnist(root: Path | None, download: bool) -> tuple[torch.Tensor, ...]:
    if download and root is not None:
        try:
            _find_fashion_mnist(root)
        except DataError:
            try:
                FashionMNIST(str(root), download=True)  # writes root/FashionMNIST/raw/
            except (RuntimeError, OSError) as err:
                raise DataError(
                    f"downloading Fashion-MNIST to {root} failed ({_one_line(err)}): install it "
                    "with `apt-get install dataset-fashion-mnist` or pass --data-root DIR"
                ) from None
    files = _find_fashion_mnist(root)
    out = []
    for split in ("train", "test"):
        images = _read_idx(files[f"{split}_images"], 3)
        labels = _read_idx(files[f"{split}_labels"], 1)
        if len(images) != len(labels) or labels.max(initial=0) >= 10:
            raise DataError(
                f"Fashion-MNIST {split} files in {files[f'{split}_images'].parent} disagree "
                f"({len(images)} images, {len(labels)} labels, max label {labels.max(initial=0)})"
            )
        out += [
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        ]
    return tuple(out)


# ----------------------------------------------------------------------------------------- CIFAR
def _cifar_class(name: str) -> type:
    return CIFAR10 if name == "cifar10" else CIFAR100


def _cifar_missing(name: str, root: Path, why: str) -> DataError:
    folder = _cifar_class(name).base_folder
    return DataError(
        f"{_CIFAR_LABELS[name]} {why} under {root}: pass --download on a machine with internet, "
        f"or put {folder} there (or pass --data-root DIR)"
    )


def _check_cifar(name: str, root: Path) -> None:
    cls = _cifar_class(name)
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in names if not (root / cls.base_folder / f).is_file()]
    if missing:
        raise _cifar_missing(name, root, f"not found ({cls.base_folder}/{missing[0]} is missing)")


def _load_cifar(name: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    cls = _cifar_class(name)
    if not download:
        _check_cifar(name, root)
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download and train)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted" (checksums)
            raise _cifar_missing(name, root, "is missing or corrupt (checksum failed)") from None
        except OSError as err:  # a failed download (URLError is an OSError)
            raise _cifar_missing(
                name, root, f"could not be downloaded ({_one_line(err)})"
            ) from None
        # HWC uint8 -> NCHW uint8, converted once
        out += [
            torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(ds.targets, dtype=torch.int64),
        ]
    return tuple(out)


# -------------------------------------------------------------------------------------- synthetic
def _synthetic(n: int, seed: int, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images: each class a fixed smooth random template (shared by every split) plus
    uniform noise, so a small model can learn it; deterministic for a given ``n`` and ``seed``."""
    templates_gen = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    coarse = torch.rand(info.num_classes, info.in_chans, 8, 8, generator=templates_gen)
    templates = F.interpolate(coarse, size=(info.height, info.width), mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(info.num_classes, (n,), generator=gen)
    noise = torch.rand(n, *info.input_shape, generator=gen)
    # template weight 0.2: SGD on a linear model (lr 0.01, batch 64, 1024 images) reaches ~73 % test
    # accuracy after one epoch and ~99 % after four (~60 % with crop + flip), so smoke tests learn
    # fast yet accuracy does not saturate at once
    images = 0.2 * templates[labels] + 0.8 * noise  # pixels in [0, 1]
    return (images * 255).round().to(torch.uint8), labels


# -------------------------------------------------------------------------------------- ImageNet
def _check_imagenet(root: Path | None) -> Path:
    if root is None:
        raise DataError("ImageNet needs --data-root DIR holding train/ and val/ class folders")
    for sub in ("train", "val"):
        folder = root / sub
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise DataError(
                f"ImageNet not found: {folder} must hold one folder of images per class "
                "(ImageFolder layout); pass --data-root DIR with train/ and val/"
            )
    return root


def _imagenet_files(root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(path, label) of every image in ``root/train`` and ``root/val``; same classes in both."""
    try:
        train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    except FileNotFoundError as err:  # a class folder without any image
        raise DataError(f"ImageNet under {root}: {_one_line(err)}") from None
    if train.class_to_idx != val.class_to_idx:
        raise DataError(
            f"ImageNet class folders differ between {root / 'train'} ({len(train.classes)}) and "
            f"{root / 'val'} ({len(val.classes)}): both need the same class folders"
        )
    return train.samples, val.samples


# ----------------------------------------------------------------------------------- public API
def check_available(name: str, root: Path | None = None) -> None:
    """Raise :class:`DataError` unless dataset ``name`` can be loaded from disk (cheap: looks for
    the files, does not read them). The synthetic dataset is always available."""
    dataset_info(name)
    root = Path(root).expanduser() if root is not None else None
    if name == "fashion-mnist":
        _find_fashion_mnist(root)
    elif name in _CIFAR_LABELS:
        _check_cifar(name, root or default_data_root())
    elif name == "imagenet":
        _check_imagenet(root)


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _split_indices(
    n_train: int,
    n_test: int,
    val_size: int,
    split_seed: int,
    train_subset: int | None,
    test_subset: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted train, val and test indices (see the module docstring)."""
    if not 1 <= val_size < n_train:  # no validation images: every accuracy would read 0 %
        raise DataError(
            f"val_size must be in [1, {n_train - 1}] for {n_train} images, not {val_size}"
        )
    perm = _permutation(n_train, split_seed)
    val, train = perm[:val_size], perm[val_size:]
    test = _permutation(n_test, split_seed)
    for what, subset, pool in (("train", train_subset, train), ("test", test_subset, test)):
        if subset is not None and not 1 <= subset <= len(pool):
            raise DataError(f"{what}_subset must be in [1, {len(pool)}], not {subset}")
    train = train[:train_subset] if train_subset is not None else train
    test = test[:test_subset] if test_subset is not None else test
    return train.sort().values, val.sort().values, test.sort().values


def load_splits(
    name: str,
    root: Path | None = None,
    *,
    download: bool = False,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    workers: int | None = None,
) -> Splits:
    """Load dataset ``name`` and split it into train, val and test.

    Args:
        name: one of :data:`DATASETS`.
        root: where to look (see the module docstring); None = the defaults.
        download: let torchvision download CIFAR or Fashion-MNIST into ``root`` when absent.
        device: where in-memory images live and batches are produced.
        val_size: images carved from train for validation (default: the dataset's ``val_size``).
        split_seed: seed of the permutation that carves the validation split and the subsets.
        train_subset, test_subset: keep only this many train/test images (smoke tests). For the
            synthetic dataset they set its sizes (default 2048 and 512).
        workers: DataLoader worker processes for ImageNet (default: min(8, CPU count)).

    Raises:
        DataError: unknown name, missing or corrupt files, impossible split sizes.
    """
    info = dataset_info(name)
    val_size = info.val_size if val_size is None else val_size
    root = Path(root).expanduser() if root is not None else None
    if name == "imagenet":
        train_files, test_files = _imagenet_files(_check_imagenet(root))
        train, val, test = _split_indices(
            len(train_files), len(test_files), val_size, split_seed, train_subset, test_subset
        )
        return Splits(
            info,
            *(
                ImageFolderSplit([files[i] for i in idx.tolist()], info, device, workers)
                for files, idx in ((train_files, train), (train_files, val), (test_files, test))
            ),
        )
    if name == "fashion-mnist":
        x_train, y_train, x_test, y_test = _load_fashion_mnist(root, download)
    elif name in _CIFAR_LABELS:
        x_train, y_train, x_test, y_test = _load_cifar(name, root or default_data_root(), download)
    else:
        n_train, n_test = train_subset or info.train_images, test_subset or info.test_images
        x_train, y_train = _synthetic(n_train + val_size, _SYNTHETIC_SEED + 1, info)
        x_test, y_test = _synthetic(n_test, _SYNTHETIC_SEED + 2, info)
    train, val, test = _split_indices(
        len(x_train), len(x_test), val_size, split_seed, train_subset, test_subset
    )
    device = torch.device(device)

    def split(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> TensorSplit:
        return TensorSplit(x[idx].to(device), y[idx].to(device), info)

    return Splits(
        info,
        split(x_train, y_train, train),
        split(x_train, y_train, val),
        split(x_test, y_test, test),
    )
