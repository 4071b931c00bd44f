"""Whole-batch loading (l2bn.data.batched): the crop/flip gather against torchvision, evaluation batches
bit-identical to a DataLoader's, training draws equal in distribution, and exact resume with augment="batched"."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from torch.utils.data import DataLoader, RandomSampler, Subset, TensorDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from l2bn.data import TensorImageDataset, build_data
from l2bn.data.batched import CropFlip, InMemoryBatches, crop_flip, in_memory_images
from l2bn.data.training_split import RelabeledDataset
from l2bn.train import TrainConfig, train
from l2bn.train.recipes import get_recipe

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MEAN, STD = (0.2860, 0.5), (0.3530, 0.25)


def _fashion_like(n: int = 300, augment: bool = True, seed: int = 0) -> TensorImageDataset:
    """Two-channel uint8 28×28 images with Fashion-MNIST's transform shape (crop pad 2, flip, scale, normalise)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 2, 28, 28), dtype=torch.uint8, generator=g)
    steps = [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()] if augment else []
    tf = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return TensorImageDataset(images, torch.arange(n) % 10, tf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aug", [CropFlip(2, True), CropFlip(1, False), CropFlip(0, True)], ids=str)
def test_every_draw_is_torchvisions_pad_crop_flip(aug, device):
    x = torch.randint(0, 256, (aug.choices, 3, 9, 7), dtype=torch.uint8).to(device)
    draws = torch.arange(aug.choices)
    out = crop_flip(x, aug, draws)
    seen = set()
    for i, d in enumerate(draws.tolist()):
        flip, rest = (d % 2, d // 2) if aug.flip else (0, d)
        top, left = divmod(rest, 2 * aug.padding + 1)
        ref = TF.crop(TF.pad(x[i], [aug.padding] * 4), top, left, 9, 7)
        assert torch.equal(out[i], TF.horizontal_flip(ref) if flip else ref), d
        seen.add((top, left, flip))
    assert len(seen) == aug.choices  # a bijection onto the (top, left, flip) grid


def test_evaluation_batches_are_bit_identical_to_the_dataloaders():
    base = _fashion_like(augment=False)
    views = [base, Subset(base, list(range(5, 290, 3))),
             RelabeledDataset(Subset(base, list(range(100))), np.arange(100)[::-1] % 10)]
    for view in views:
        source = in_memory_images(view)
        assert source is not None and source.augment is None
        ours = list(InMemoryBatches(view, source, 64))
        theirs = list(DataLoader(view, batch_size=64))
        assert len(ours) == len(theirs)
        for (xa, ya), (xb, yb) in zip(ours, theirs):
            assert xa.dtype == xb.dtype and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_only_crop_flip_then_dtype_normalise_sets_are_batched():
    assert in_memory_images(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4))) is None
    images, labels = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4)
    assert in_memory_images(TensorImageDataset(images, labels, v2.RandomRotation(10))) is None
    assert in_memory_images(TensorImageDataset(images, labels, v2.RandomCrop(8, padding=1, fill=3))) is None
    assert in_memory_images(TensorImageDataset(images, labels, v2.RandomHorizontalFlip(p=0.3))) is None
    assert in_memory_images(_fashion_like(20)).augment == CropFlip(2, True)
    assert in_memory_images(build_data("digits").train).augment == CropFlip(1, False)


def _offsets(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) of batches of the position-coded images of :func:`_coded` (values standardised back)."""
    rows = torch.round(batch[:, 0] * 255).long()  # 1 + source row, 0 where padding came in
    cols = torch.round(batch[:, 1] * 255).long()
    flip = cols[:, 14, 15] < cols[:, 14, 14]
    dy = rows[:, 14, 14] - 1 - 14
    dx = torch.where(flip, cols[:, 14, 14] - 1 - (27 - 14), cols[:, 14, 14] - 1 - 14)
    return dy.numpy(), dx.numpy(), flip.numpy()


def _coded(n: int) -> TensorImageDataset:
    grid = torch.arange(1, 29, dtype=torch.uint8)
    images = torch.stack([grid[:, None].expand(28, 28), grid[None, :].expand(28, 28)]).expand(n, 2, 28, 28)
    tf = v2.Compose([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    return TensorImageDataset(images.contiguous(), torch.zeros(n, dtype=torch.long), tf)


def _uniform_p(dy, dx, flip) -> float:
    counts = np.zeros((5, 5, 2))
    np.add.at(counts, (dy + 2, dx + 2, flip.astype(int)), 1)
    return float(stats.chisquare(counts.ravel()).pvalue)


def test_batched_draws_are_equal_in_distribution_to_torchvisions():
    """Offsets uniform over [-2, 2]², flips at p = 0.5 and independent of them: a chi-square test on the 50
    cells, for the batched path and (as the reference it must match) for torchvision's per-sample transforms."""
    data = _coded(2000)
    g = torch.Generator().manual_seed(7)
    loader = InMemoryBatches(data, in_memory_images(data), 128, sampler=RandomSampler(data, generator=g),
                             generator=torch.Generator().manual_seed(8))
    batched = [np.concatenate(v) for v in zip(*(_offsets(x) for _ in range(5) for x, _ in loader))]
    torch.manual_seed(9)
    per_sample = [np.concatenate(v) for v in zip(*(_offsets(x) for _ in range(5) for x, _ in DataLoader(data, 128)))]
    for dy, dx, flip in (batched, per_sample):
        assert len(dy) == 10_000 and set(dy) == set(dx) == set(range(-2, 3))
        assert _uniform_p(dy, dx, flip) > 1e-3
        assert abs(flip.mean() - 0.5) < 0.02
    # and the test has power: a crop that never shifts left is caught
    dy, dx, flip = batched
    assert _uniform_p(dy, np.clip(dx, 0, None), flip) < 1e-6


def tiny(num_classes: int, in_channels: int, norm: str) -> nn.Module:
    from l2bn.norms import get_norm_layer

    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), get_norm_layer(norm)(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def _run(path, augment, data):
    recipe = get_recipe("digits-quick", epochs=3, batch_size=64, metrics_every=3)
    config = TrainConfig(out=str(path), norm="l2bn", recipe=recipe, progress=False, augment=augment)
    return train(config, model_fn=tiny, data=data, log=lambda m: None)


def test_batched_augmentation_resumes_byte_identically(tmp_path):
    data = build_data("digits")
    _run(tmp_path / "full", "batched", data)
    recipe = get_recipe("digits-quick", epochs=3, batch_size=64, metrics_every=3)
    part = TrainConfig(out=str(tmp_path / "part"), norm="l2bn", recipe=recipe, progress=False, augment="batched")
    train(part, model_fn=tiny, data=data, log=lambda m: None, stop_after=1)
    part.resume = True
    train(part, model_fn=tiny, data=data, log=lambda m: None)
    full = (tmp_path / "full" / "metrics.jsonl").read_bytes()
    assert (tmp_path / "part" / "metrics.jsonl").read_bytes() == full
    # other draws than the per-sample path: another run, and the identity says which
    _run(tmp_path / "sample", "per-sample", data)
    assert (tmp_path / "sample" / "metrics.jsonl").read_bytes() != full
    stored = json.loads((tmp_path / "full" / "config.json").read_text())
    assert stored["augment"] == "batched"
    part.augment = "per-sample"
    with pytest.raises(ValueError, match="augment: checkpoint 'batched' vs now 'per-sample'"):
        train(part, model_fn=tiny, data=data, log=lambda m: None)


def test_batched_augmentation_is_refused_for_sets_it_cannot_batch(tmp_path):
    with pytest.raises(ValueError, match="augment must be one of"):
        TrainConfig(augment="gpu")
    data = build_data("digits")
    odd = TensorImageDataset(data.train.images, data.train.labels, v2.RandomRotation(5))
    with pytest.raises(ValueError, match="augment='batched' needs an in-memory image set"):
        _run(tmp_path / "odd", "batched", dataclasses.replace(data, train=odd))
    assert not (tmp_path / "odd").exists()
