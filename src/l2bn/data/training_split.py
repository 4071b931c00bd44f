"""Carving the training split for a study: a fixed validation hold-out, a class-imbalance profile and symmetric
label noise. Each is drawn from its own fixed seed, never the run's, so every norm and seed of a study trains
on the same images and labels.

- ``validation_split``: a stratified hold-out of the training split for epoch selection (the test set is then
  never used to choose anything).
- ``long_tail_counts`` / ``imbalanced_indices``: the exponential profile of long-tailed CIFAR (Cao et al.,
  "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019): class ``c`` of
  ``C`` keeps ``n_max · ratio^(−c/(C−1))`` images, so the largest class has ``ratio`` times the smallest.
- ``noisy_labels``: symmetric label noise — each label, with probability ``rate``, is replaced by one of the
  other ``C − 1`` classes drawn uniformly (as in Han et al., "Co-teaching", NeurIPS 2018).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .subset import dataset_labels, stratified_indices

__all__ = ["RelabeledDataset", "carve_training_split", "imbalanced_indices", "long_tail_counts", "noisy_labels", "validation_split"]

VALIDATION_SEED, IMBALANCE_SEED, NOISE_SEED = 1, 2, 3


def validation_split(labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (training, validation) indices: a stratified ``size``-sample hold-out of ``labels``."""
    if not 0 < size < len(labels):
        raise ValueError(f"the validation split must hold between 1 and {len(labels) - 1} of the {len(labels)} "
                         f"training samples, got {size}")
    held = stratified_indices(labels, size, seed=VALIDATION_SEED)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def long_tail_counts(class_sizes: np.ndarray, ratio: float) -> np.ndarray:
    """Images kept per class under the exponential profile: ``min(n_c, n_max · ratio^(−c/(C−1)))``."""
    if not ratio >= 1:
        raise ValueError(f"the imbalance ratio must be >= 1 (largest class / smallest), got {ratio}")
    classes = len(class_sizes)
    share = ratio ** (-np.arange(classes) / max(classes - 1, 1))
    counts = np.floor(class_sizes.max() * share).astype(np.int64)
    return np.maximum(np.minimum(counts, class_sizes), 1)


def imbalanced_indices(labels: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices keeping :func:`long_tail_counts` images of each class, drawn without replacement."""
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes])
    counts = long_tail_counts(sizes, ratio)
    rng = np.random.default_rng(IMBALANCE_SEED)
    kept = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, counts)]
    return np.sort(np.concatenate(kept))


def noisy_labels(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    """``labels`` with a ``rate`` share flipped, each to a uniformly drawn other class (symmetric noise)."""
    if not 0 <= rate < 1:
        raise ValueError(f"the label-noise rate must be in [0, 1), got {rate}")
    rng = np.random.default_rng(NOISE_SEED)
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, num_classes, len(labels))  # 1..C-1: never the true class
    return np.where(flip, (labels + shift) % num_classes, labels).astype(np.int64)


class RelabeledDataset(Dataset):
    """``dataset`` with its labels replaced by ``labels`` (same order); the inputs are untouched."""

    def __init__(self, dataset: Dataset, labels: np.ndarray | Tensor) -> None:
        if len(labels) != len(dataset):
            raise ValueError(f"{len(labels)} labels for a dataset of {len(dataset)} samples")
        self.dataset = dataset
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[index][0], int(self.labels[index])


def carve_training_split(train: Dataset, train_eval: Dataset, num_classes: int, *, val_size: int | None = None,
                         imbalance: float | None = None, label_noise: float = 0.0) -> tuple[Dataset, Dataset, Dataset | None]:
    """``(train, train_eval, val)`` after, in this order: the validation hold-out (from ``train_eval``: no
    augmentation; clean labels), the imbalance profile, and label noise on ``train`` only (``train_eval`` keeps
    the true labels, so the angle metrics describe the classes the images really belong to)."""
    labels = dataset_labels(train)
    val = None
    if val_size is not None:
        keep, held = validation_split(labels, val_size)
        val = Subset(train_eval, held.tolist())
        train, train_eval, labels = Subset(train, keep.tolist()), Subset(train_eval, keep.tolist()), labels[keep]
    if imbalance is not None:
        keep = imbalanced_indices(labels, imbalance)
        train, train_eval, labels = Subset(train, keep.tolist()), Subset(train_eval, keep.tolist()), labels[keep]
    if label_noise:
        train = RelabeledDataset(train, noisy_labels(labels, label_noise, num_classes))
    return train, train_eval, val
