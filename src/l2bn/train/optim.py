"""The optimiser side of a run: the learning-rate factor per (fractional) epoch, SGD's parameter groups and
the per-step clamp of the norm zoo's gates."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ..norms import clip_gates_, param_groups
from .recipes import Recipe, warm_restart_factor

__all__ = ["build_optimizer", "conv_weight_decay_groups", "gate_clipper", "lr_factor", "recipe_param_groups"]


def lr_factor(recipe: Recipe, epoch_progress: float) -> float:
    """Multiplier of ``recipe.lr`` after ``epoch_progress`` epochs (fractional: the schedule steps per batch).

    Linear warm-up over ``warmup_epochs``; then cosine to 0 at ``epochs``, or ``gamma`` per passed milestone,
    or cosine cycles with warm restarts (:func:`~l2bn.train.recipes.warm_restart_factor`).
    """
    t = epoch_progress
    if t < recipe.warmup_epochs:
        return (t + 1e-8) / recipe.warmup_epochs
    if recipe.schedule == "cosine-restarts":
        return warm_restart_factor(recipe, t - recipe.warmup_epochs)
    if recipe.schedule == "cosine":
        span = recipe.epochs - recipe.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - recipe.warmup_epochs) / span)))
    if recipe.schedule == "step":
        return recipe.gamma ** sum(1 for m in recipe.milestones if math.floor(t + 1e-9) >= m)
    return 1.0


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
                    ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over :func:`recipe_param_groups` and its per-batch schedule (:func:`lr_factor`)."""
    optimizer = torch.optim.SGD(recipe_param_groups(model, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, step / steps_per_epoch))
    return optimizer, scheduler


def gate_clipper(model: nn.Module) -> Callable[[], None]:
    """What to call after each optimiser step: clamp the model's BIN gates to [0, 1] (nothing without gates)."""
    return lambda: clip_gates_(model)
