"""Carving the training split: validation hold-out, long-tail imbalance and symmetric label noise, each fixed
(independent of the run's seed) and checked against the definitions."""
import numpy as np
import pytest
import torch

from l2bn.data.subset import dataset_labels
from l2bn.data.training_split import (RelabeledDataset, carve_training_split, imbalanced_indices, long_tail_counts,
                                      noisy_labels, validation_split)
from l2bn.data.base import TensorImageDataset


def _balanced(per_class: int = 60, classes: int = 10) -> TensorImageDataset:
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)  # the image names its index
    return TensorImageDataset(images, labels)


def test_validation_split_is_stratified_disjoint_and_fixed():
    labels = dataset_labels(_balanced())
    keep, held = validation_split(labels, 100)
    assert len(held) == 100 and len(keep) == 500 and not set(keep) & set(held)
    assert np.bincount(labels[held]).tolist() == [10] * 10
    again = validation_split(labels, 100)
    assert (again[0] == keep).all() and (again[1] == held).all()
    with pytest.raises(ValueError, match="validation split must hold between 1 and 599"):
        validation_split(labels, 600)


def test_long_tail_profile_is_exponential_from_the_largest_class():
    counts = long_tail_counts(np.full(10, 1000), 100.0)
    assert counts[0] == 1000 and counts[-1] == 10
    expected = np.floor(1000 * 100.0 ** (-np.arange(10) / 9))
    assert counts.tolist() == expected.astype(int).tolist()
    assert long_tail_counts(np.full(10, 1000), 1.0).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="imbalance ratio must be >= 1"):
        long_tail_counts(np.full(10, 5), 0.5)


def test_imbalanced_indices_keep_the_profile():
    labels = np.repeat(np.arange(10), 500)
    kept = imbalanced_indices(labels, 100.0)
    assert np.bincount(labels[kept]).tolist() == long_tail_counts(np.full(10, 500), 100.0).tolist()
    assert (imbalanced_indices(labels, 100.0) == kept).all()


def test_symmetric_noise_flips_the_rate_to_other_classes_uniformly():
    labels = np.repeat(np.arange(10), 2000)
    noisy = noisy_labels(labels, 0.3, 10)
    flipped = noisy != labels
    assert flipped.mean() == pytest.approx(0.3, abs=0.01)
    shifts = (noisy[flipped] - labels[flipped]) % 10
    assert shifts.min() >= 1 and np.bincount(shifts, minlength=10)[1:].min() > 0.8 * flipped.sum() / 9
    assert (noisy_labels(labels, 0.3, 10) == noisy).all() and (noisy_labels(labels, 0.0, 10) == labels).all()
    with pytest.raises(ValueError, match="label-noise rate must be in"):
        noisy_labels(labels, 1.0, 10)


def test_carving_orders_holdout_imbalance_noise_and_keeps_true_labels_for_evaluation():
    data = _balanced(per_class=100)
    train, train_eval, val = carve_training_split(data, data, 10, val_size=100, imbalance=10.0, label_noise=0.3)
    assert len(val) == 100 and np.bincount(dataset_labels(val)).tolist() == [10] * 10
    counts = np.bincount(dataset_labels(train_eval), minlength=10)
    assert counts.tolist() == long_tail_counts(np.full(10, 90), 10.0).tolist()
    images = {int(train_eval[i][0]) for i in range(len(train_eval))}
    assert images == {int(train[i][0]) for i in range(len(train))}  # the same images in both views
    assert not images & {int(val[i][0]) for i in range(len(val))}
    true = dataset_labels(train_eval)
    assert isinstance(train, RelabeledDataset) and 0.2 < (dataset_labels(train) != true).mean() < 0.4
    assert all(train[i][1] == int(train.labels[i]) for i in range(5))
    untouched = carve_training_split(data, data, 10)
    assert untouched == (data, data, None)
