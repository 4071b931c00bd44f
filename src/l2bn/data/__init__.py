"""Datasets for the experiments: ``build_data(name, data_dir)`` → train / train-eval / test splits.

The registry: each name maps to a builder returning a :class:`~l2bn.data.base.DataBundle` — the image sets of
:mod:`l2bn.data.vision` and TAU 2020 Mobile (:mod:`l2bn.data.tau2020`, imported on first use: it needs
librosa).
"""
from __future__ import annotations

import os
from typing import Callable

from .base import DataBundle, DataError, TensorImageDataset
from .vision import cifar, digits, fashion_mnist, imagenet

__all__ = ["DataBundle", "DataError", "TensorImageDataset", "build_data", "list_datasets"]


def _tau2020(data_dir=None, download=False, augment=True) -> DataBundle:
    from .tau2020 import tau2020

    return tau2020(data_dir, augment=augment)


_BUILDERS: dict[str, Callable[..., DataBundle]] = {
    "digits": lambda data_dir=None, download=False, augment=True: digits(augment=augment),
    "fashion-mnist": lambda data_dir=None, download=False, augment=True: fashion_mnist(data_dir, download, augment),
    "cifar10": lambda data_dir=None, download=False, augment=True: cifar("cifar10", data_dir, download, augment),
    "cifar100": lambda data_dir=None, download=False, augment=True: cifar("cifar100", data_dir, download, augment),
    "imagenet": lambda data_dir=None, download=False, augment=True: imagenet(data_dir, augment),
    "tau2020": _tau2020,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_data`."""
    return list(_BUILDERS)


def build_data(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False, augment: bool = True
) -> DataBundle:
    """Build the named dataset (see :func:`list_datasets`)."""
    key = name.lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(_BUILDERS)}")
    return _BUILDERS[key](data_dir=data_dir, download=download, augment=augment)
