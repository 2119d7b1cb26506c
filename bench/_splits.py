"""One split of a dataset and its batches: in memory (:class:`TensorSplit`) or streamed from
image files (:class:`ImageFolderSplit`). Both yield ``(images, labels)``: float32 N x C x H x W
normalised with the dataset's mean and std, and int64 labels, on the split's device.
``bench.data`` builds them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader

from bench.dataset_info import DatasetInfo

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

__all__ = ["ImageFolderSplit", "TensorSplit", "random_crop_flip"]


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")


class _Normalise:
    """uint8 0..255 images -> float32 ``(x / 255 - mean) / std``, as one multiply-add."""

    def __init__(self, info: DatasetInfo, device: torch.device) -> None:
        std = torch.tensor(info.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(info.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    def __call__(self, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
        out = torch.addcmul(self.shift, images.float(), self.scale)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of the zero-padded images, then a horizontal flip with probability 1/2.

    The batched equivalent of torchvision's ``RandomCrop(size, padding)`` +
    ``RandomHorizontalFlip()``: one padded copy of the batch, then two gathers (rows, then columns)
    whose indices carry each image's offset and flip; about twice as fast on CPU as one 4-index
    gather. Random numbers come from ``generator`` (a CPU generator; None = torch's global one),
    so a seeded generator repeats the batch.

    Args:
        images: N x C x H x W, any dtype (uint8 here); zero padding = black pixels.
        padding: pixels added on each side before cropping back to H x W; 0 = flip only.
        generator: source of the offsets and flips.
    """
    n, c, h, w = images.shape
    dev = images.device
    offset_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    offset_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offset_y[:, None] + torch.arange(h, device=dev)  # N x H
    xs = torch.arange(w, device=dev)
    cols = offset_x[:, None] + torch.where(flip[:, None], w - 1 - xs, xs)  # N x W
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


class _Split:
    """What both kinds of split share: a length, :meth:`num_batches` and :meth:`batches`.

    A subclass sets ``labels`` (N int64) and ``info`` and yields the batches in :meth:`_batches`.
    """

    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        _check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> Batches:
        """One pass over the split in batches of normalised float32 images and int64 labels.

        Args:
            batch_size: images per batch (the last one may be smaller unless ``drop_last``).
            shuffle: visit the images in a random order.
            augment: in memory, random crop (``info.crop_padding`` px of zero padding) +
                horizontal flip; image files, ImageNet's (see :class:`ImageFolderSplit`).
            generator: CPU generator for the order and the augmentation; same seed, same batches.
            drop_last: skip a last, smaller batch.
            channels_last: return images in the channels_last (NHWC) memory format.
        """
        _check_batch_size(batch_size)
        yield from self._batches(batch_size, shuffle, augment, generator, drop_last, channels_last)

    def _batches(self, batch_size, shuffle, augment, generator, drop_last, channels_last):
        """The batches of :meth:`batches`, its arguments checked (a generator)."""
        raise NotImplementedError


class TensorSplit(_Split):
    """A split held in memory as uint8 images and int64 labels on one device.

    Attributes:
        images: N x C x H x W uint8, unnormalised (public for calibration code).
        labels: N int64.
        info: the dataset's :class:`bench.dataset_info.DatasetInfo` (normalisation, crop padding).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"need N x C x H x W uint8 images and N labels, got {tuple(images.shape)} "
                f"{images.dtype} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.info = info
        self._normalise = _Normalise(info, images.device)

    @property
    def device(self) -> torch.device:
        """Where the images live and batches are produced."""
        return self.images.device

    def __repr__(self) -> str:
        return f"TensorSplit({self.info.name}, n={len(self)}, device={self.device})"

    def _batches(self, batch_size, shuffle, augment, generator, drop_last, channels_last):
        n_batches = self.num_batches(batch_size, drop_last)
        if shuffle:
            order = torch.randperm(len(self), generator=generator).to(self.device)
        else:
            order = torch.arange(len(self), device=self.device)
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            images = self.images[idx]
            if augment:
                images = random_crop_flip(images, self.info.crop_padding, generator)
            yield self._normalise(images, channels_last), self.labels[idx]


class _Files(torch.utils.data.Dataset):
    """(path, label) pairs read as uint8 C x H x W tensors through a torchvision transform."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


class ImageFolderSplit(_Split):
    """A split of image files (ImageNet) streamed through a DataLoader, with the same ``batches()``
    as :class:`TensorSplit`.

    Training augmentation is ``RandomResizedCrop(224)`` + flip; evaluation is ``Resize(256)`` +
    ``CenterCrop(224)`` (sizes from ``info``). Workers decode and crop to uint8; normalisation runs
    on the device. With ``workers >= 1`` a seeded generator repeats the batches (the DataLoader
    seeds each worker from it); with 0 workers the crops use torch's global random state.

    Attributes:
        samples: (path, label) of each image.
        labels: N int64 (CPU).
        info: the dataset's :class:`bench.dataset_info.DatasetInfo`.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        info: DatasetInfo,
        device: str | torch.device = "cpu",
        workers: int | None = None,
    ) -> None:
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.info = info
        self.device = torch.device(device)
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self._normalise = _Normalise(info, self.device)

    def __repr__(self) -> str:
        return f"ImageFolderSplit({self.info.name}, n={len(self)}, workers={self.workers})"

    def _transform(self, augment: bool):
        size = (self.info.height, self.info.width)
        if augment:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:  # the usual 0.875 centre crop: 256 -> 224
            steps = [T.Resize(round(size[0] / 0.875)), T.CenterCrop(size)]
        return T.Compose([*steps, T.PILToTensor()])

    def _batches(self, batch_size, shuffle, augment, generator, drop_last, channels_last):
        loader = torch.utils.data.DataLoader(
            _Files(self.samples, self._transform(augment)),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            yield self._normalise(images, channels_last), labels.to(self.device, non_blocking=True)
