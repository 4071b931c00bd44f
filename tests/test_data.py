"""Dataset loaders on tiny files each test writes in the real on-disk format; clear errors for bad data."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from l2bn.data import DataError, build_data, list_datasets
from l2bn.data import vision


# ------------------------------------------------------------------------------------------------ digits
def test_digits_fixed_stratified_split_and_standardisation():
    from sklearn.datasets import load_digits

    a, b = build_data("digits"), build_data("digits")
    assert (len(a.train), len(a.test), a.num_classes, a.in_channels, a.image_size) == (1347, 450, 10, 1, 8)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    # stratified: every class keeps its share of the 1797 images within one sample
    target = load_digits().target
    test_counts = np.bincount(a.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - np.bincount(target) * 0.25) <= 1)
    # train/test are disjoint and together are the whole set (compare as raw pixel rows)
    raw = {tuple(r) for r in (load_digits().images.reshape(-1, 64) / 16.0).round(6)}
    rows = torch.cat([a.train.images, a.test.images]).reshape(-1, 64).double().numpy().round(6)
    assert {tuple(r) for r in rows} == raw
    # eval transform: standardised with the training split's pixel mean and std
    x = torch.stack([a.train_eval[i][0] for i in range(len(a.train_eval))]).double()
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std().item() == pytest.approx(1.0, abs=1e-4)
    # augmentation: a random crop with padding 1 is a shift by at most one pixel with zero fill
    mean, std = a.train.images.mean().item(), a.train.images.std().item()
    original = torch.nn.functional.pad(a.train.images[5], (1, 1, 1, 1))
    shifts = [original[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        img, label = a.train[5]
        raw = img * std + mean
        match = [k for k, s in enumerate(shifts) if torch.allclose(raw, s, atol=1e-5)]
        assert match and label == int(a.train.labels[5])
        seen.add(match[0])
    assert len(seen) > 3


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="expected one of digits, fashion-mnist, cifar10"):
        build_data("mnist-xl")
    assert set(list_datasets()) == {"digits", "fashion-mnist", "cifar10", "cifar100", "imagenet", "tau2020"}


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def _idx(array: np.ndarray) -> bytes:
    """IDX (LeCun) format: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fashion(folder, n_train=12, n_test=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx(array)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(vision, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")


def _undo(dataset, index, mean=0.2860, std=0.3530):
    return dataset[index][0] * std + mean


@pytest.mark.parametrize("layout", ["debian-gz", "torchvision-raw"])
def test_fashion_mnist_reads_real_formats(tmp_path, no_system_fashion, layout):
    if layout == "debian-gz":  # /usr/share/datasets/fashion-mnist/*.gz
        root = tmp_path / "fm"
        arrays = _write_fashion(root, gz=True)
    else:  # torchvision: <root>/FashionMNIST/raw/*-ubyte
        root = tmp_path / "tv"
        arrays = _write_fashion(root / "FashionMNIST" / "raw", gz=False)
    data = build_data("fashion-mnist", root)
    assert (len(data.train), len(data.test), data.num_classes, data.in_channels) == (12, 6, 10, 1)
    for i in (0, 5):
        expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][i]).float() / 255
        assert torch.allclose(_undo(data.test, i)[0], expected, atol=1e-5)
        assert data.test[i][1] == int(arrays["t10k-labels-idx1-ubyte"][i])
        assert torch.allclose(
            _undo(data.train_eval, i)[0], torch.from_numpy(arrays["train-images-idx3-ubyte"][i]).float() / 255,
            atol=1e-5,
        )
    torch.manual_seed(1)
    assert data.train[3][0].shape == (1, 28, 28)


def test_fashion_mnist_uses_the_system_directory(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    arrays = _write_fashion(system, gz=True, n_train=10, n_test=4)
    monkeypatch.setattr(vision, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setenv("L2BN_CACHE", str(tmp_path / "cache"))
    data = build_data("fashion-mnist")
    assert len(data.train) == 10 and data.test[2][1] == int(arrays["t10k-labels-idx1-ubyte"][2])
    assert (tmp_path / "cache" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_missing_says_where_and_how(tmp_path, no_system_fashion):
    with pytest.raises(DataError) as err:
        build_data("fashion-mnist")
    msg = str(err.value)
    assert "no-system-copy" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg


def test_fashion_mnist_data_dir_without_the_files_is_an_error_not_the_system_copy(tmp_path, monkeypatch):
    """A --data-dir is where the user says the data is: no silent fall-back to the system copy."""
    system = tmp_path / "usr-share"
    _write_fashion(system, gz=True, n_train=10, n_test=4)
    monkeypatch.setattr(vision, "FASHION_MNIST_SYSTEM_DIR", system)
    with pytest.raises(DataError) as err:
        build_data("fashion-mnist", tmp_path / "empty")
    msg = str(err.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg and str(system) not in msg


def test_fashion_mnist_corrupt_file(tmp_path, no_system_fashion):
    root = tmp_path / "bad"
    _write_fashion(root, gz=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        build_data("fashion-mnist", root)


# -------------------------------------------------------------------------------------------------- CIFAR
def _write_cifar(root, name, per_batch=4, seed=0):
    """Pickled batches exactly as in cifar-10-python.tar.gz / cifar-100-python.tar.gz (latin1 pickles)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for i, fname in enumerate(files):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10 if name == "cifar10" else 100, per_batch)]
        entry = {"data": data, key: labels, "batch_label": fname}
        if name == "cifar100":
            entry["coarse_labels"] = [v // 5 for v in labels]
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[fname] = (data, labels)
    return folder, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickled_batches(tmp_path, name):
    _, written = _write_cifar(tmp_path, name)
    data = build_data(name, tmp_path)
    n_train_files = 5 if name == "cifar10" else 1
    assert len(data.train) == 4 * n_train_files and len(data.test) == 4
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.in_channels == 3
    test_data, test_labels = written["test_batch" if name == "cifar10" else "test"]
    mean, std = vision._CIFAR_STATS[name]
    for i in range(4):
        img, label = data.test[i]
        raw = torch.from_numpy(test_data[i].reshape(3, 32, 32)).float() / 255  # channel-major rows
        restored = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert torch.allclose(restored, raw, atol=1e-5) and label == test_labels[i]
    # augmentation: a random crop 32 with padding 4 (zero fill) and a horizontal flip, i.e. a shift by at
    # most 4 pixels of the (maybe mirrored) image; both flips show up
    train_data = written["data_batch_1" if name == "cifar10" else "train"][0]
    padded = torch.nn.functional.pad(torch.from_numpy(train_data[1].reshape(3, 32, 32)).float() / 255, (4,) * 4)
    views = {(i, j, flip): (padded.flip(-1) if flip else padded)[:, i : i + 32, j : j + 32]
             for i in range(9) for j in range(9) for flip in (False, True)}
    torch.manual_seed(0)
    flips = set()
    for _ in range(20):
        img = data.train[1][0]
        assert img.shape == (3, 32, 32)
        raw = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        match = [k for k, v in views.items() if torch.allclose(raw, v, atol=1e-5)]
        assert match, "augmented image is not a padded crop (+ flip) of the original"
        flips.add(match[0][2])
    assert flips == {False, True}


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"looked for .*cifar-10-batches-py.*--download"):
        build_data("cifar10", tmp_path)
    with pytest.raises(DataError, match="pass --data-dir"):
        build_data("cifar100")
    folder, _ = _write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        build_data("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR file .*data_batch_3"):
        build_data("cifar10", tmp_path)


class _Payload:
    """Pickles to a call of ``func(*args)``: what a crafted CIFAR batch would run on an unrestricted load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["system", "eval", "codec"])
def test_a_crafted_cifar_batch_runs_nothing_and_is_refused_naming_the_file(tmp_path, payload):
    import codecs
    import os

    folder, _ = _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    call = {"system": _Payload(os.system, f"touch {marker}"),
            "eval": _Payload(eval, f"open({str(marker)!r}, 'w')"),
            "codec": _Payload(codecs.encode, "x", "rot13")}[payload]
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": call, "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError) as exc:
        build_data("cifar10", tmp_path)
    message = str(exc.value)
    assert not marker.exists()  # the payload never ran
    assert "data_batch_2 is not a plain CIFAR batch" in message and "\n" not in message and "re-download" in message
    assert {"system": "posix.system", "eval": "builtin__.eval", "codec": "'rot13'"}[payload] in message


def test_plain_pickles_of_arrays_load_in_every_protocol(tmp_path):
    from l2bn.data.safe_pickle import load_plain_pickle

    value = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2], "n": np.int64(3),
             "name": "batch", "raw": b"\x00\xff", "pair": (1.5, None)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "p").write_bytes(pickle.dumps(value, protocol=protocol))
        loaded = load_plain_pickle(tmp_path / "p")
        assert loaded.keys() == value.keys() and (loaded["data"] == value["data"]).all()
        assert [loaded[k] for k in ("labels", "n", "name", "raw", "pair")] == [value[k] for k in ("labels", "n", "name", "raw", "pair")]


# ----------------------------------------------------------------------------------------------- ImageNet
def _write_imagefolder(root, classes=("n01", "n02"), per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(pixels).save(root / split / c / f"img{i}.{ext}")


def test_imagenet_folders(tmp_path):
    _write_imagefolder(tmp_path)
    data = build_data("imagenet", tmp_path)
    assert (len(data.train), len(data.test), data.num_classes, data.in_channels) == (4, 4, 2, 3)
    img, label = data.test[3]
    assert img.shape == (3, 224, 224) and img.dtype == torch.float32 and label == 1
    # eval: shorter side resized to 256 (40×48 → 256×307), then the central 224×224, then ImageNet statistics
    path = tmp_path / "val" / "n02" / "img1.png"
    resized = Image.open(path).convert("RGB").resize((307, 256), Image.BILINEAR)
    top, left = int(round((256 - 224) / 2)), int(round((307 - 224) / 2))
    crop = torch.from_numpy(np.array(resized.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1) / 255
    mean, std = torch.tensor(vision._IMAGENET_STATS[0]).view(3, 1, 1), torch.tensor(vision._IMAGENET_STATS[1]).view(3, 1, 1)
    assert torch.allclose(img * std + mean, crop, atol=1e-5)
    torch.manual_seed(0)
    assert data.train[0][0].shape == (3, 224, 224)


def test_imagenet_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match=r"no .*train\. Expected .*/train/<class>/<image>"):
        build_data("imagenet", tmp_path)
    _write_imagefolder(tmp_path)
    bad = tmp_path / "val" / "n02" / "img0.JPEG"
    bad.write_bytes(b"not a jpeg")
    data = build_data("imagenet", tmp_path)
    with pytest.raises(DataError, match="cannot read image .*img0.JPEG"):
        data.test[2]
