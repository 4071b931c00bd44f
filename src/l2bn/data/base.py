"""The dataset contract every builder meets: a :class:`DataBundle` of splits, :class:`DataError` when data is
missing or unreadable, and :class:`TensorImageDataset` for sets small enough to keep in memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DataBundle", "DataError", "TensorImageDataset"]


class DataError(RuntimeError):
    """Data missing or unreadable; the message says where we looked and how to get the data."""


@dataclass
class DataBundle:
    """Splits of one dataset plus what a model needs to know about it."""

    name: str
    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    val: Dataset | None = None  # a validation hold-out of the training split, when a run asks for one


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` (uint8 or float) and int64 labels, with a per-sample transform."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
