"""Per-device confusion matrices: groups through Subset wrappers, counts, accuracy per device group."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset

from l2bn.train.confusion import ConfusionByGroup, device_groups, group_accuracy


class Clips(Dataset):
    def __init__(self, devices):
        self.devices = devices
        self.classes = ("x", "y", "z")

    def __len__(self):
        return len(self.devices)

    def __getitem__(self, i):
        return torch.zeros(1), 0


def test_groups_follow_subsets_and_sort_devices():
    data = Clips(["s2", "a", "b", "s2", "a", "s10"])
    names, ids, classes = device_groups(Subset(Subset(data, [5, 3, 1, 0]), [1, 2, 3]))
    assert names == ["a", "b", "s10", "s2"] and classes == ["x", "y", "z"]
    assert ids.tolist() == [3, 0, 3]  # samples 3, 1, 0 of the base set: s2, a, s2
    assert device_groups(torch.utils.data.TensorDataset(torch.zeros(2))) is None


def test_counts_and_group_accuracy():
    names, ids, classes = device_groups(Clips(["a", "a", "b", "s1", "s1", "s2"]))
    acc = ConfusionByGroup(names, ids, classes, 3, torch.device("cpu"))
    acc.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))  # a: right, a: wrong, b: right
    acc.update(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]))  # s1: right, s1: wrong, s2: right
    record = acc.record()
    counts = torch.tensor(record["counts"])
    assert record["groups"] == ["a", "b", "s1", "s2"] and counts.shape == (4, 3, 3) and counts.sum() == 6
    assert counts[0, 2, 1] == 1 and counts[2, 0, 1] == 1
    assert group_accuracy(record, ["a"]) == 50.0 and group_accuracy(record, ["b", "s2"]) == 100.0
    assert group_accuracy(record, ["a", "b", "s1", "s2"]) == pytest.approx(400 / 6)
    assert group_accuracy(record, ["s6"]) != group_accuracy(record, ["s6"])  # NaN: no such device
    with pytest.raises(ValueError, match="more test samples"):
        acc.update(torch.tensor([0]), torch.tensor([0]))
