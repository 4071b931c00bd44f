"""Name → constructor registry for normalization layers (timm-style: channels first, then keywords)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn

NormLayer = Callable[..., nn.Module]

_REGISTRY: dict[str, NormLayer] = {}


def register_norm(name: str, constructor: NormLayer) -> NormLayer:
    """Register ``constructor(num_features, **kwargs)`` under a case-insensitive ``name``."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"norm {name!r} is already registered")
    _REGISTRY[key] = constructor
    return constructor


def list_norms(*, sort: bool = True) -> list[str]:
    """Registered norm names, sorted (``sort=False``: in the order they were registered)."""
    return sorted(_REGISTRY) if sort else list(_REGISTRY)


def get_norm_layer(name: str | NormLayer, **kwargs) -> NormLayer:
    """A channels-first constructor for ``name``, usable as torchvision's ``norm_layer`` argument.

    A callable is returned as is (with ``kwargs`` bound), so APIs can accept either form.
    """
    if callable(name):
        return partial(name, **kwargs) if kwargs else name
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(list_norms())}")
    constructor = _REGISTRY[key]
    return partial(constructor, **kwargs) if kwargs else constructor


def create_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the norm layer ``name`` for ``num_features`` channels."""
    return get_norm_layer(name)(num_features, **kwargs)
