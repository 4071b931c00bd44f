"""Evaluation of a model: test loss and accuracy, per-device confusion, and the paper's angle metrics of the
classifier-input features (supplementary A) — centers from the training data, intra(test) against them."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ..metrics import AngleAccumulator, FeatureHook, IntraAngleAccumulator
from .config import AMP_DTYPES
from .confusion import ConfusionByGroup, device_groups
from .ddp import all_reduce_sum
from .rundir import ANGLE_KEYS

__all__ = ["evaluate", "test_pass", "train_center_pass"]

Forward = Callable[[Tensor], Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a compiled and/or DDP-wrapped ``model``."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _forward_fn(model: nn.Module, device: torch.device, amp: str | None, channels_last: bool) -> Forward:
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast:
            return model(x).float()

    return forward


@torch.no_grad()
def train_center_pass(forward: Forward, feature_model: nn.Module, loader: DataLoader, *, num_classes: int,
                      device: torch.device, max_batches: int | None = None
                      ) -> tuple[Tensor, IntraAngleAccumulator, float]:
    """Class centers of ``feature_model``'s classifier input over ``loader`` (at most ``max_batches`` batches a
    rank), intra(train) against them, and the accuracy on those images (the model in evaluation mode, no
    augmentation: whether the network fits its training data), all summed over ranks."""
    stored: list[tuple[Tensor, Tensor]] = []
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # correct, count
    with FeatureHook(feature_model) as hook:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            y = y.to(device)
            hits[0] += (forward(x).argmax(1) == y).sum()
            hits[1] += y.numel()
            stored.append((hook.features.float(), y))
    dim = torch.tensor([stored[0][0].shape[1] if stored else 0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
    centers_acc = AngleAccumulator(num_classes, dim=int(dim), device=device)
    for f, y in stored:
        centers_acc.update(f, y)
    centers_acc.all_reduce()
    centers = centers_acc.centers()
    intra_train = IntraAngleAccumulator(centers, device=device)
    for f, y in stored:
        intra_train.update(f, y)
    intra_train.all_reduce()
    all_reduce_sum(hits)
    return centers, intra_train, float(100.0 * hits[0] / hits[1]) if hits[1] else math.nan


@torch.no_grad()
def test_pass(forward: Forward, loader: DataLoader, *, num_classes: int, device: torch.device,
              feature_model: nn.Module | None = None, centers: Tensor | None = None
              ) -> tuple[dict[str, Any], IntraAngleAccumulator | None]:
    """Test loss/accuracy (and ``test_confusion`` for a set with ``devices``) over the whole ``loader``, summed
    over ranks; with ``centers``, also intra(test) of ``feature_model``'s classifier input against them."""
    groups = device_groups(loader.dataset)
    confusion = ConfusionByGroup(*groups, num_classes, device) if groups is not None else None
    intra_test = IntraAngleAccumulator(centers, device=device) if centers is not None else None
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, count per class
    with FeatureHook(feature_model) if intra_test is not None else contextlib.nullcontext() as hook:
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            logits = forward(x)
            hit = logits.argmax(1) == y
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += hit.sum()
            sums[2] += y.numel()
            per_class[0].index_add_(0, y, hit.double())
            per_class[1].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            if confusion is not None:
                confusion.update(logits.argmax(1), y)
            if intra_test is not None:
                intra_test.update(hook.features.float(), y)
    all_reduce_sum(sums)
    all_reduce_sum(per_class)
    result: dict[str, Any] = {"test_loss": float(sums[0] / sums[2]), "test_acc": float(100.0 * sums[1] / sums[2]),
                              "test_class_acc": (100.0 * per_class[0] / per_class[1]).tolist()}
    if confusion is not None:
        result["test_confusion"] = confusion.record()
    if intra_test is not None:
        intra_test.all_reduce()
    return result, intra_test


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_loader: DataLoader,
    train_loader: DataLoader | None = None,
    *,
    val_loader: DataLoader | None = None,
    num_classes: int,
    device: torch.device,
    amp: str | None = None,
    channels_last: bool = False,
    max_batches: int | None = None,
    feature_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Test loss/accuracy and, with ``train_loader``, the angle metrics (summed over ranks under DDP).

    The train pass (at most ``max_batches`` batches a rank) gives the class centers and intra(train); the
    test pass (always complete) gives accuracy and intra(test) against those train centers.
    ``feature_model`` is the unwrapped module whose classifier input is captured (its ``feature_layer``'s
    input, else its last ``nn.Linear``'s). A test set with ``devices`` also gets ``test_confusion`` per device
    (:mod:`l2bn.train.confusion`). With ``val_loader``, ``val_loss`` and ``val_acc`` of that set too.
    """
    was_training = model.training
    model.eval()
    forward = _forward_fn(model, device, amp, channels_last)
    feature_model = feature_model or unwrap(model)
    try:
        centers = intra_train = None
        if train_loader is not None:
            centers, intra_train, fit = train_center_pass(forward, feature_model, train_loader,
                                                          num_classes=num_classes, device=device,
                                                          max_batches=max_batches)
        result, intra_test = test_pass(forward, test_loader, num_classes=num_classes, device=device,
                                       feature_model=feature_model, centers=centers)
        if intra_test is not None:
            result.update(_angle_metrics(intra_train, intra_test), train_eval_acc=fit)
        if val_loader is not None:
            val, _ = test_pass(forward, val_loader, num_classes=num_classes, device=device)
            result.update(val_loss=val["test_loss"], val_acc=val["test_acc"])
    finally:
        model.train(was_training)
    return result


def _angle_metrics(intra_train: IntraAngleAccumulator, intra_test: IntraAngleAccumulator) -> dict[str, float]:
    """The five angle metrics and the two cone angles; NaN with a warning where they are undefined (e.g.
    features collapsed to zero)."""
    keys = (*ANGLE_KEYS, "cone_train", "cone_test")
    try:
        train_stats, test_stats = intra_train.compute(), intra_test.compute()
        values = (train_stats.intra, test_stats.intra, train_stats.inter, train_stats.iir,
                  test_stats.intra / train_stats.inter, train_stats.cone, test_stats.cone)
    except (ValueError, ZeroDivisionError) as exc:
        warnings.warn(f"angle metrics undefined, logged as NaN: {exc}", RuntimeWarning, stacklevel=3)
        values = (math.nan,) * len(keys)
    return dict(zip(keys, values))
