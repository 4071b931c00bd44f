"""Test-set confusion matrices per recording device (or any per-sample group a test set declares).

A test set that has a ``devices`` attribute (one name per sample, as ``l2bn.data.tau2020`` datasets do) gets
one confusion matrix per device at every evaluation, stored in the epoch record as ``test_confusion``:
``{"groups": [names], "classes": [names], "counts": [group][true class][predicted class]}``, summed over DDP
ranks. Reports derive per-device accuracy and the confusion figure from it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .ddp import all_reduce_sum

__all__ = ["ConfusionByGroup", "device_groups", "group_accuracy"]


def _base_and_indices(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under any ``Subset`` wrappers and the base index of each of ``dataset``'s samples."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def device_groups(dataset: Dataset) -> tuple[list[str], Tensor, list[str] | None] | None:
    """Group names (sorted: ``a, b, c, s1, …``), each sample's group index in ``dataset`` order and the class
    names (the dataset's ``classes``, if any); ``None`` when the (possibly ``Subset``-wrapped) dataset has no
    ``devices``."""
    base, indices = _base_and_indices(dataset)
    devices: Sequence[str] | None = getattr(base, "devices", None)
    if devices is None:
        return None
    names = sorted(set(devices))
    lookup = {name: i for i, name in enumerate(names)}
    classes = getattr(base, "classes", None)
    ids = torch.tensor([lookup[devices[i]] for i in indices], dtype=torch.long)
    return names, ids, list(classes) if classes is not None else None


class ConfusionByGroup:
    """Counts (groups, classes, classes) of (true, predicted) pairs, fed batch by batch in dataset order."""

    def __init__(self, names: Sequence[str], group_of_sample: Tensor, classes: Sequence[str] | None, num_classes: int,
                 device: torch.device) -> None:
        self.names, self.num_classes = list(names), num_classes
        self.classes = list(classes) if classes is not None else [str(k) for k in range(num_classes)]
        self.group_of_sample = group_of_sample.to(device)
        self.counts = torch.zeros(len(names) * num_classes * num_classes, dtype=torch.float64, device=device)
        self.seen = 0

    def update(self, predicted: Tensor, target: Tensor) -> None:
        groups = self.group_of_sample[self.seen : self.seen + target.numel()]
        if groups.numel() != target.numel():
            raise ValueError(f"more test samples than the {self.group_of_sample.numel()} the groups were made for")
        self.seen += target.numel()
        flat = (groups * self.num_classes + target) * self.num_classes + predicted
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).double()

    def record(self) -> dict:
        """The JSON-able record, summed over ranks."""
        all_reduce_sum(self.counts)
        counts = self.counts.round().long().reshape(len(self.names), self.num_classes, self.num_classes)
        return {"groups": self.names, "classes": self.classes, "counts": counts.tolist()}


def group_accuracy(confusion: dict, groups: Sequence[str]) -> float:
    """Accuracy (%) over the samples of ``groups`` in a ``test_confusion`` record (NaN if it has none)."""
    counts = torch.tensor(confusion["counts"], dtype=torch.float64)
    chosen = [i for i, name in enumerate(confusion["groups"]) if name in set(groups)]
    if not chosen:
        return float("nan")
    sub = counts[chosen]
    total = float(sub.sum())
    return 100.0 * float(sub.diagonal(dim1=1, dim2=2).sum()) / total if total else float("nan")
