"""Whole-batch loading of in-memory image sets: gather a batch, crop and flip it with tensor ops, standardise.

A :class:`TensorImageDataset` (or a ``Subset`` / ``RelabeledDataset`` view of one) whose transform is random
crop with zero padding and/or horizontal flip followed by ``ToDtype`` / ``Normalize`` (digits, Fashion-MNIST,
CIFAR) can be read as whole tensors: no per-sample ``__getitem__``, transform or collate. Without augmentation
(the evaluation sets) the batches are bit-identical to a DataLoader's. With augmentation the crop offsets and
flips of a batch come from one draw of a seeded generator, so they are equal in distribution to torchvision's
per-sample ``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()`` but not the same draws. The images can
live on the GPU (``device``), where the whole batch path then runs, as fast CIFAR trainers do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler, SequentialSampler, Subset
from torchvision.transforms import v2

from .base import TensorImageDataset
from .training_split import RelabeledDataset

__all__ = ["CropFlip", "InMemoryBatches", "InMemoryImages", "crop_flip", "in_memory_images"]


@dataclass(frozen=True)
class CropFlip:
    """Random crop to the image size after zero padding of ``padding`` pixels a side; a horizontal flip at
    probability 0.5 if ``flip``."""

    padding: int
    flip: bool

    @property
    def choices(self) -> int:
        """Number of equally likely (top, left, flip) outcomes a sample draws from."""
        return (2 * self.padding + 1) ** 2 * (2 if self.flip else 1)


def crop_flip(images: Tensor, aug: CropFlip, draws: Tensor) -> Tensor:
    """Each image of ``images`` (B, C, H, W) cropped at its offsets and maybe mirrored, as one gather.

    ``draws`` (B,) holds integers in ``[0, aug.choices)``: flip = draw % 2 (when flipping), then
    top = rest // (2p + 1) and left = rest % (2p + 1), offsets into the zero-padded image."""
    b, c, h, w = images.shape
    p, side = aug.padding, 2 * aug.padding + 1
    draws = draws.to(images.device)
    flip = draws % 2 if aug.flip else torch.zeros_like(draws)
    rest = draws // 2 if aug.flip else draws
    top, left = rest // side, rest % side
    padded = F.pad(images, (p, p, p, p)) if p else images
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None].bool(), w - 1 - cols, cols) + left[:, None]  # (B, W)
    rows = torch.arange(h, device=images.device) + top[:, None]  # (B, H)
    index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, index).reshape(b, c, h, w)


@dataclass
class InMemoryImages:
    """What a batch path needs of a dataset: its images and labels (already in the view's order), the random
    crop/flip of its transform (``None``: none) and the deterministic rest, applied to whole batches."""

    images: Tensor
    labels: Tensor
    augment: CropFlip | None
    finish: Callable[[Tensor], Tensor]


def _unwrap(dataset: Dataset) -> tuple[TensorImageDataset, Tensor, Tensor] | None:
    """The underlying in-memory set, the indices the view reads and its labels; ``None`` for other sets."""
    if isinstance(dataset, TensorImageDataset):
        return dataset, torch.arange(len(dataset)), dataset.labels
    if isinstance(dataset, Subset):
        inner = _unwrap(dataset.dataset)
        if inner is None:
            return None
        base, idx, labels = inner
        sel = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return base, idx[sel], labels[sel]
    if isinstance(dataset, RelabeledDataset):
        inner = _unwrap(dataset.dataset)
        return None if inner is None else (inner[0], inner[1], dataset.labels)
    return None


def _split_transform(transform, size: Sequence[int]) -> tuple[CropFlip | None, list] | None:
    """(crop/flip, deterministic tail) of a per-sample transform, or ``None`` if it holds anything else."""
    steps = [] if transform is None else list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    padding, flip = None, False
    while steps and isinstance(steps[0], (v2.RandomCrop, v2.RandomHorizontalFlip)):
        t = steps.pop(0)
        if isinstance(t, v2.RandomHorizontalFlip):
            if t.p != 0.5 or flip:
                return None
            flip = True
        elif (padding is not None or flip or tuple(t.size) != tuple(size) or t.padding_mode != "constant"
              or t.fill != 0 or t.pad_if_needed or len(set(t.padding or [0])) != 1):
            return None
        else:
            padding = (t.padding or [0])[0]
    if not all(isinstance(t, (v2.ToDtype, v2.Normalize)) for t in steps):
        return None
    aug = CropFlip(padding or 0, flip) if padding or flip else None
    return aug, steps


def in_memory_images(dataset: Dataset) -> InMemoryImages | None:
    """``dataset`` as :class:`InMemoryImages` if it is a view of a :class:`TensorImageDataset` whose transform
    is crop/flip then ``ToDtype``/``Normalize`` (or less); ``None`` otherwise."""
    inner = _unwrap(dataset)
    if inner is None:
        return None
    base, idx, labels = inner
    split = _split_transform(base.transform, base.images.shape[-2:])
    if split is None:
        return None
    aug, tail = split
    return InMemoryImages(base.images[idx], labels, aug, v2.Compose(tail) if tail else (lambda x: x))


class InMemoryBatches:
    """A DataLoader stand-in over :class:`InMemoryImages`: index batches from ``sampler`` (default: in order),
    each gathered, cropped/flipped with one draw of ``generator`` (if the set augments) and finished as a
    whole. ``dataset`` is the original view (for code that inspects a loader's dataset)."""

    def __init__(self, dataset: Dataset, source: InMemoryImages, batch_size: int, *, sampler: Sampler | None = None,
                 drop_last: bool = False, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> None:
        if source.augment is not None and generator is None:
            raise ValueError("an augmenting in-memory batch loader needs a generator (the run's epoch generator)")
        self.dataset, self.batch_size, self.drop_last, self.generator = dataset, batch_size, drop_last, generator
        self.sampler = sampler if sampler is not None else SequentialSampler(range(len(source.images)))
        self.device = torch.device(device)
        self.images, self.labels = source.images.to(self.device), source.labels.to(self.device)
        self.augment, self.finish = source.augment, source.finish

    def __len__(self) -> int:
        return len(BatchSampler(self.sampler, self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for indices in BatchSampler(self.sampler, self.batch_size, self.drop_last):
            idx = torch.as_tensor(indices, dtype=torch.long).to(self.device)
            x = self.images.index_select(0, idx)
            if self.augment is not None:
                x = crop_flip(x, self.augment, torch.randint(self.augment.choices, (len(idx),),
                                                             generator=self.generator))
            yield self.finish(x), self.labels.index_select(0, idx)
