"""What each dataset is (:func:`dataset_info`): classes, image shape, normalisation, default
validation size and crop padding. Reads nothing from disk, so validation, models and the splits
(``bench._splits``) can ask without loading data; ``bench.data`` finds and loads the images.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["DATASETS", "DataError", "DatasetInfo", "dataset_info", "split_sizes"]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")


class DataError(Exception):
    """Data that is missing, corrupt or asked for wrongly; the message is one line saying what was
    looked for, where, and how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the harness need to know about a dataset, without reading it.

    Attributes:
        name: one of :data:`DATASETS`.
        num_classes: number of classes.
        in_chans, height, width: image shape (the model's input at evaluation).
        mean, std: per-channel normalisation, on the 0..1 pixel scale.
        val_size: default number of training images carved off as the validation split.
        crop_padding: pixels of zero padding of the random-crop augmentation (0 = no crop).
        train_images, test_images: images of the official training and test sets (validation is
            carved from the training set); None where only the files tell (an ImageNet folder).
            The synthetic dataset: its default sizes, validation images generated on top.
    """

    name: str
    num_classes: int
    in_chans: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_size: int
    crop_padding: int = 0
    train_images: int | None = None
    test_images: int | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.in_chans, self.height, self.width)


_INFO = {
    info.name: info
    for info in (
        # Fashion-MNIST statistics of the training set; crop padding 2 px on 28 x 28
        DatasetInfo("fashion-mnist", 10, 1, 28, 28, (0.2860,), (0.3530,), 5000, 2, 60000, 10000),
        # CIFAR: true per-channel std of the training set (not the oft-copied 0.2023, 0.1994, ...)
        DatasetInfo(
            "cifar10",
            10,
            3,
            32,
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            5000,
            4,
            50000,
            10000,
        ),
        DatasetInfo(
            "cifar100",
            100,
            3,
            32,
            32,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            5000,
            4,
            50000,
            10000,
        ),
        # ImageNet: 10 validation images per class carved from train; crops are RandomResizedCrop
        DatasetInfo(
            "imagenet", 1000, 3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10000
        ),
        DatasetInfo(
            "synthetic", 10, 3, 32, 32, (0.5, 0.5, 0.5), (0.23, 0.23, 0.23), 256, 4, 2048, 512
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Facts about dataset ``name``; reads nothing from disk."""
    if name not in _INFO:
        close = difflib.get_close_matches(name, DATASETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}")
    return _INFO[name]


def _subset(what: str, subset: int | None, pool: int | None) -> int | None:
    if subset is None:
        return pool
    if subset < 1 or (pool is not None and subset > pool):
        upper = f", {pool}" if pool is not None else ", ..."
        raise DataError(f"{what}_subset must be in [1{upper}], not {subset}")
    return subset


def split_sizes(
    info: DatasetInfo,
    val_size: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> tuple[int | None, int, int | None]:
    """Images in the train, val and test splits that ``bench.data.load_splits`` gives, from the
    sizes alone (None: only the files tell); :class:`DataError` for sizes the data cannot have."""
    val = info.val_size if val_size is None else val_size
    if val < 1:
        raise DataError(f"val_size must be >= 1, not {val}: every accuracy would read 0 %")
    if info.name == "synthetic":  # generated to order: the validation images come on top
        train = _subset("train", train_subset, None) or info.train_images
        return train, val, _subset("test", test_subset, None) or info.test_images
    train_pool = None
    if info.train_images is not None:
        if val >= info.train_images:
            raise DataError(
                f"val_size must be in [1, {info.train_images - 1}] for {info.train_images} "
                f"images, not {val}"
            )
        train_pool = info.train_images - val
    return (
        _subset("train", train_subset, train_pool),
        val,
        _subset("test", test_subset, info.test_images),
    )
