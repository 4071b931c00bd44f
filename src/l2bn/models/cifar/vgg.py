"""CIFAR VGG (Simonyan & Zisserman, ICLR 2015, configurations D and E) with a norm after every convolution.

Five stages of 3×3 convolutions (64, 128, 256, 512, 512 channels) each ending in 2×2 max pooling, then
global average pooling and one linear layer (the usual CIFAR head; 32×32 input is 1×1 after the last pool).
Pools use ``ceil_mode`` so inputs down to 8×8 still work. Convolutions have no bias (a norm follows).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._utils import NormLayer, init_weights, resolve_norm

__all__ = ["CifarVGG", "vgg_parts", "vgg16_bn", "vgg19_bn", "VGG_STAGES"]

#: Convolution widths per stage.
VGG_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _stage(in_channels: int, widths: Sequence[int], norm: Callable) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU(inplace=True)]
        in_channels = width
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG for small images; ``config`` is a key of :data:`VGG_STAGES` or a tuple of per-stage widths."""

    def __init__(
        self,
        config: str | Sequence[Sequence[int]] = "vgg16",
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: str | NormLayer | None = None,
    ) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in VGG_STAGES:
                raise ValueError(f"unknown VGG config {config!r}; known: {', '.join(VGG_STAGES)}")
            config = VGG_STAGES[config]
        norm = resolve_norm(norm_layer)
        self.num_stages = len(config)
        for index, widths in enumerate(config, start=1):
            setattr(self, f"stage{index}", _stage(in_channels, widths, norm))
            in_channels = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self, norm.modules)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features: the input of the classification layer."""
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def vgg_parts(model: CifarVGG) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stage<k>`` (the convolutions before the k-th pool); ``classifier``: the norm of the
    last convolution (after ReLU, pooling and global pooling it is the classifier's input)."""
    parts = {f"stage{k}": (f"stage{k}",) for k in range(1, model.num_stages + 1)}
    last = getattr(model, f"stage{model.num_stages}")
    parts["classifier"] = (f"stage{model.num_stages}.{len(last) - 3}",)
    return parts


def vgg16_bn(**kwargs) -> CifarVGG:
    """VGG-16 (configuration D) with a norm after each of its 13 convolutions."""
    return CifarVGG("vgg16", **kwargs)


def vgg19_bn(**kwargs) -> CifarVGG:
    """VGG-19 (configuration E) with a norm after each of its 16 convolutions."""
    return CifarVGG("vgg19", **kwargs)
