"""The optimiser side of a run: the per-batch learning-rate schedule, SGD's parameter groups and the per-step
clamp of the norm zoo's gates."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import (
    ConstantLR, CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR,
)

from ..norms import clip_gates_, param_groups
from .recipes import Recipe, warm_restart_factor

__all__ = ["build_optimizer", "build_scheduler", "conv_weight_decay_groups", "gate_clipper", "recipe_param_groups"]

WARMUP_START = 1e-8  # the warm-up's first factor, in epochs: (step / steps_per_epoch + 1e-8) / warmup_epochs


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> LRScheduler:
    """The recipe's learning-rate schedule, stepped once per batch, from :mod:`torch.optim.lr_scheduler`.

    ``LinearLR`` warm-up over ``warmup_epochs``, then ``CosineAnnealingLR`` to 0 at ``epochs``,
    ``MultiStepLR`` (``gamma`` at each milestone epoch) or ``ConstantLR``. ``cosine-restarts`` stays
    :func:`~l2bn.train.recipes.warm_restart_factor` through ``LambdaLR``: its cycle lengths are a free list
    and the rate stays at ``min_lr`` after the last cycle, which ``CosineAnnealingWarmRestarts`` cannot do.
    """
    warmup = recipe.warmup_epochs * steps_per_epoch
    if recipe.schedule == "cosine-restarts":
        return LambdaLR(optimizer, lambda step: _warm_restart_factor(recipe, step / steps_per_epoch))
    if recipe.schedule == "cosine":
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch - warmup)
    elif recipe.schedule == "step":
        main = MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in recipe.milestones], recipe.gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = LinearLR(optimizer, start_factor=WARMUP_START / recipe.warmup_epochs, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _warm_restart_factor(recipe: Recipe, epoch_progress: float) -> float:
    """``cosine-restarts`` after ``epoch_progress`` (fractional) epochs, linear warm-up first."""
    if epoch_progress < recipe.warmup_epochs:
        return (epoch_progress + WARMUP_START) / recipe.warmup_epochs
    return warm_restart_factor(recipe, epoch_progress - recipe.warmup_epochs)


def conv_weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: convolution weights with ``weight_decay``, every other parameter without (the Keras
    references' ``kernel_regularizer=l2(c)`` on convolutions: a penalty c·Σw² is weight decay 2c)."""
    conv = [m.weight for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    chosen = {id(p) for p in conv}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": conv, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def recipe_param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Weight decay on convolution weights only (``weight_decay_scope="conv"``), else the norm zoo's groups
    (e.g. BIN gates without weight decay; one group when the model has no gates)."""
    if recipe.weight_decay_scope == "conv":
        return conv_weight_decay_groups(model, recipe.weight_decay)
    return param_groups(model, recipe.lr, recipe.weight_decay)


def build_optimizer(model: nn.Module, recipe: Recipe, steps_per_epoch: int
                    ) -> tuple[torch.optim.SGD, LRScheduler]:
    """SGD over :func:`recipe_param_groups` and its per-batch schedule (:func:`build_scheduler`)."""
    optimizer = torch.optim.SGD(recipe_param_groups(model, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    return optimizer, build_scheduler(optimizer, recipe, steps_per_epoch)


def gate_clipper(model: nn.Module) -> Callable[[], None]:
    """What to call after each optimiser step: clamp the model's BIN gates to [0, 1] (nothing without gates)."""
    return lambda: clip_gates_(model)
