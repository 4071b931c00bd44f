"""Image classification data: digits, Fashion-MNIST, CIFAR-10/100, ImageNet — real loaders, clear errors.

Every builder returns a :class:`DataBundle` holding the training split with augmentation (``train``), the same
split without augmentation (``train_eval``, for the angle metrics of supplementary A) and the test split.
Small sets are kept as uint8 tensors in memory (:class:`TensorImageDataset`), so an epoch costs no decoding.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from .base import DataBundle, DataError, TensorImageDataset
from .safe_pickle import UnsafePickleError, load_plain_pickle

__all__ = ["FASHION_MNIST_SYSTEM_DIR", "cifar", "digits", "fashion_mnist", "imagenet"]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Per-channel statistics of the training sets (standard values, in [0, 1] pixel units).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_FASHION_STATS = ((0.2860,), (0.3530,))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tensor_transform(mean: Sequence[float], std: Sequence[float], augment: Sequence[v2.Transform] = ()) -> v2.Compose:
    """uint8 CHW tensor → augment → float in [0, 1] → per-channel standardisation."""
    return v2.Compose([*augment, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def digits(seed: int = 0, test_size: float = 0.25, augment: bool = True) -> DataBundle:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), fixed stratified train/test split.

    Pixels (0–16) are scaled to [0, 1] and standardised with the training split's mean and std. ``augment``
    adds a 1-pixel random shift (random crop 8 with padding 1); no flips, digits are not mirror-symmetric.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=bunch.target, random_state=seed
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    mean, std = images[idx_train].mean().item(), images[idx_train].std().item()
    norm = v2.Normalize((mean,), (std,))
    train_tf = v2.Compose([v2.RandomCrop(8, padding=1), norm]) if augment else norm
    return DataBundle(
        name="digits",
        train=TensorImageDataset(images[idx_train], labels[idx_train], train_tf),
        train_eval=TensorImageDataset(images[idx_train], labels[idx_train], norm),
        test=TensorImageDataset(images[idx_test], labels[idx_test], norm),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def _find_fashion_files(candidates: Sequence[Path]) -> tuple[Path, dict[str, Path]] | None:
    """First candidate directory holding all four idx files, plain or ``.gz``."""
    for folder in candidates:
        found = {}
        for name in _FASHION_FILES:
            for suffix in ("", ".gz"):
                if (folder / (name + suffix)).is_file():
                    found[name] = folder / (name + suffix)
                    break
        if len(found) == len(_FASHION_FILES):
            return folder, found
    return None


def _fashion_raw_root(data_dir: Path | None, cache_dir: Path | None) -> Path:
    """A root with ``FashionMNIST/raw/*-ubyte`` (torchvision's layout), decompressing ``.gz`` files if needed."""
    bases = [data_dir] if data_dir is not None else [FASHION_MNIST_SYSTEM_DIR]  # a given --data-dir is the only place
    candidates = [p for b in bases for p in (b / "FashionMNIST" / "raw", b / "raw", b)]
    hit = _find_fashion_files(candidates)
    if hit is None:
        looked = "\n  ".join(str(p) for p in candidates)
        raise DataError(
            "Fashion-MNIST not found. Looked for train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) in:\n  {looked}\n"
            "Get it with `apt-get install dataset-fashion-mnist` (Debian), or pass --download with --data-dir, "
            "or copy the four files into --data-dir."
        )
    folder, files = hit
    if all(p.suffix != ".gz" for p in files.values()) and folder.name == "raw" and folder.parent.name == "FashionMNIST":
        return folder.parent.parent
    root = cache_dir or (data_dir if data_dir is not None and os.access(data_dir, os.W_OK) else None)
    root = root or Path(os.environ.get("L2BN_CACHE", Path.home() / ".cache" / "l2bn"))
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = raw / name
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = dst.with_suffix(".tmp")
        try:
            with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"Fashion-MNIST file {src} is unreadable or corrupt ({exc}); reinstall or re-download it") from exc
        os.replace(tmp, dst)
    return Path(root)


def fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = False, augment: bool = True, cache_dir: str | None = None
) -> DataBundle:
    """Fashion-MNIST (28×28 grey, 10 classes) through torchvision's reader.

    Looks in ``data_dir`` (torchvision layout ``FashionMNIST/raw`` or the bare idx files) and then in
    Debian's ``/usr/share/datasets/fashion-mnist``; gzip files are decompressed once into a cache.
    Augmentation: random crop 28 with padding 2 and horizontal flip.
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    if download:
        if data_dir is None:
            raise DataError("--download needs --data-dir (where to put Fashion-MNIST)")
        _wrap(lambda: datasets.FashionMNIST(data_dir, train=True, download=True), "Fashion-MNIST", data_dir)
    root = _fashion_raw_root(data_dir, Path(cache_dir) if cache_dir else None)
    train = _wrap(lambda: datasets.FashionMNIST(root, train=True), "Fashion-MNIST", root)
    test = _wrap(lambda: datasets.FashionMNIST(root, train=False), "Fashion-MNIST", root)
    return _bundle_from_uint8(
        "fashion-mnist",
        train.data.unsqueeze(1),
        train.targets,
        test.data.unsqueeze(1),
        test.targets,
        num_classes=10,
        stats=_FASHION_STATS,
        augment=[v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()] if augment else [],
    )


def _wrap(fn: Callable, what: str, where: Path):
    """Run a torchvision constructor, turning its errors into a :class:`DataError` naming the location."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, OSError, AssertionError, pickle errors...
        raise DataError(f"{what}: could not load from {where}: {type(exc).__name__}: {exc}") from exc


def _bundle_from_uint8(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    num_classes: int,
    stats: tuple[Sequence[float], Sequence[float]],
    augment: Sequence[v2.Transform],
) -> DataBundle:
    plain = _tensor_transform(*stats)
    return DataBundle(
        name=name,
        train=TensorImageDataset(x_train, y_train, _tensor_transform(*stats, augment=augment)),
        train_eval=TensorImageDataset(x_train, y_train, plain),
        test=TensorImageDataset(x_test, y_test, plain),
        num_classes=num_classes,
        in_channels=x_train.shape[1],
        image_size=x_train.shape[-1],
    )


def _read_cifar_batches(folder: Path, files: Sequence[str], label_key: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing CIFAR file {path}")
        try:
            entry = load_plain_pickle(path)
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(entry[label_key], dtype=np.int64)
        except UnsafePickleError as exc:
            raise DataError(f"CIFAR file {path} is not a plain CIFAR batch: the pickle {exc}; it was not run — "
                            "delete it and re-download the set") from None
        except Exception as exc:
            raise DataError(f"CIFAR file {path} is corrupt ({type(exc).__name__}: {exc}); re-download it") from exc
        if len(data) != len(target):
            raise DataError(f"CIFAR file {path} is corrupt: {len(data)} images but {len(target)} labels")
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(target))
    return torch.cat(images), torch.cat(labels)


def cifar(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False, augment: bool = True
) -> DataBundle:
    """CIFAR-10 / CIFAR-100 in torchvision's on-disk layout (``cifar-10-batches-py``, ``cifar-100-python``).

    Download goes through torchvision; the pickled batches are read here, through an unpickler that builds
    only arrays and plain containers (:mod:`l2bn.data.safe_pickle`), so that a missing, corrupt or crafted
    file gives a :class:`DataError` and runs nothing. Augmentation: random crop 32 with padding 4 and horizontal flip, then
    per-channel normalisation.
    """
    if name not in _CIFAR_STATS:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected 'cifar10' or 'cifar100'")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if data_dir is None:
        raise DataError(f"{name}: pass --data-dir (the folder holding {cls.base_folder}/; add --download to fetch it)")
    root = Path(data_dir)
    if download:
        _wrap(lambda: cls(root, train=True, download=True), name, root)
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataError(
            f"{name} not found: looked for {folder}. Pass --download to fetch it with torchvision, or unpack "
            f"{cls.filename} into {root}."
        )
    key = "labels" if name == "cifar10" else "fine_labels"
    x_train, y_train = _read_cifar_batches(folder, [f for f, _ in cls.train_list], key)
    x_test, y_test = _read_cifar_batches(folder, [f for f, _ in cls.test_list], key)
    return _bundle_from_uint8(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=10 if name == "cifar10" else 100,
        stats=_CIFAR_STATS[name],
        augment=[v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else [],
    )


def imagenet(data_dir: str | os.PathLike | None = None, augment: bool = True, image_size: int = 224) -> DataBundle:
    """ImageNet-style ``train/`` and ``val/`` class folders (torchvision ImageFolder).

    Train: RandomResizedCrop + horizontal flip; eval: resize to ``image_size * 256 / 224`` and center crop.
    """
    if data_dir is None:
        raise DataError("imagenet: pass --data-dir (the folder holding train/ and val/ class folders)")
    root = Path(data_dir)
    resize = int(round(image_size * 256 / 224))
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*_IMAGENET_STATS)]
    train_tf = v2.Compose(
        [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *tail]
        if augment
        else [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail]
    )
    eval_tf = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail])
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"imagenet: no {folder}. Expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                "(the ILSVRC-2012 images, val sorted into class folders)."
            )
        splits[split] = _wrap(lambda f=folder: datasets.ImageFolder(f, transform=eval_tf), "imagenet", folder)
    train = datasets.ImageFolder(root / "train", transform=train_tf)
    if splits["val"].class_to_idx != train.class_to_idx:
        raise DataError(f"imagenet: class folders of {root}/train and {root}/val differ")
    return DataBundle(
        name="imagenet",
        train=_CheckedImages(train),
        train_eval=_CheckedImages(splits["train"]),
        test=_CheckedImages(splits["val"]),
        num_classes=len(train.classes),
        in_channels=3,
        image_size=image_size,
    )


class _CheckedImages(Dataset):
    """Wraps an ImageFolder so an unreadable image raises a :class:`DataError` naming the file."""

    def __init__(self, folder: datasets.ImageFolder) -> None:
        self.folder = folder
        self.targets = folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        try:
            return self.folder[index]
        except Exception as exc:
            path = self.folder.samples[index][0]
            raise DataError(f"imagenet: cannot read image {path} ({type(exc).__name__}: {exc})") from exc
