"""A run's model: ``l2bn.models.create_model`` with the norm resolved by name, as a run's config asks."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .config import TrainConfig

__all__ = ["ModelFn", "build_model", "run_model_fn"]

ModelFn = Callable[..., nn.Module]


def build_model(name: str, *, num_classes: int, in_channels: int, norm: str, **kwargs) -> nn.Module:
    """``l2bn.models.create_model`` with the norm resolved by name through the norm registry."""
    from ..models import create_model

    return create_model(name, num_classes=num_classes, in_channels=in_channels, norm_layer=norm, **kwargs)


def run_model_fn(config: TrainConfig, model_fn: ModelFn | None = None) -> ModelFn:
    """``model_fn`` if given, else :func:`build_model` of ``config``'s model, placement and ``model_kwargs``;
    called as ``make(num_classes=, in_channels=, norm=)``."""
    return model_fn or (lambda **kw: build_model(config.model, **kw, placement=config.placement,
                                                 **config.model_kwargs))
