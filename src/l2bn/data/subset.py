"""A stratified, seeded subset of a training split (``--train-subset N``): every class keeps its share."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["dataset_labels", "stratified_indices", "stratified_subset"]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of every sample: ``labels`` / ``targets`` when the dataset (or the one a ``Subset`` views)
    has them, else read one by one."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ("labels", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def stratified_indices(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` samples with the class proportions of ``labels`` (scikit-learn's
    stratified split, ``random_state=seed``); ``size`` equal to ``len(labels)`` keeps everything."""
    from sklearn.model_selection import train_test_split

    classes = len(np.unique(labels))
    if not classes <= size <= len(labels):
        raise ValueError(f"train_subset must be between the number of classes ({classes}) and the training set "
                         f"size ({len(labels)}), got {size}")
    if size == len(labels):
        return np.arange(len(labels))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def stratified_subset(datasets: tuple[Dataset, ...], size: int, seed: int = 0) -> tuple[Subset, ...]:
    """The same stratified ``size``-sample subset of each of ``datasets`` (views of one split, e.g. train
    with and without augmentation); the labels are read from the first."""
    indices = stratified_indices(dataset_labels(datasets[0]), size, seed).tolist()
    if any(len(d) != len(datasets[0]) for d in datasets):
        raise ValueError(f"datasets to subset together must have one length, got {[len(d) for d in datasets]}")
    return tuple(Subset(d, indices) for d in datasets)
