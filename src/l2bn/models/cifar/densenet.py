"""CIFAR DenseNets (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, section 3–4).

Three dense blocks of ``(L - 4) / 3`` layers (``/ 6`` with bottlenecks) on 32×32, 16×16 and 8×8 maps,
joined by transitions (norm-ReLU-1×1 conv-2×2 average pool), then a final norm-ReLU, global pooling and a
linear classifier. DenseNet: composite layer norm-ReLU-3×3 conv(k), stem 16 channels. DenseNet-BC adds a
norm-ReLU-1×1 conv(4k) bottleneck, a stem of 2k channels and compression θ = 0.5 in transitions.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._utils import NormLayer, init_weights, resolve_norm

__all__ = ["DenseNet", "densenet_parts", "densenet40_12", "densenet_bc100_12"]


class DenseLayer(nn.Module):
    """norm-ReLU-[1×1 conv(bottleneck)-norm-ReLU]-3×3 conv(growth); output concatenated to the input."""

    def __init__(
        self, in_channels: int, growth_rate: int, bottleneck_width: int | None, norm: Callable, drop_rate: float
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_channels)
        self.relu = nn.ReLU(inplace=True)
        if bottleneck_width:
            self.conv1 = nn.Conv2d(in_channels, bottleneck_width, kernel_size=1, bias=False)
            self.norm2 = norm(bottleneck_width)
            in_channels = bottleneck_width
        self.conv2 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(x))
        if hasattr(self, "conv1"):
            out = self.relu(self.norm2(self.conv1(out)))
        out = self.conv2(out)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    """norm-ReLU-1×1 conv-2×2 average pool between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int, norm: Callable) -> None:
        super().__init__()
        self.norm = norm(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet / DenseNet-BC for small images; ``norm_layer`` fills every norm position.

    Args:
        depth: L; the number of layers per block is ``(L - 4) / 3`` (``/ 6`` when ``bottleneck``).
        growth_rate: k.
        bottleneck: add the 1×1 conv(4k) in each layer (the "B" of BC).
        compression: θ, the transition keeps ``floor(θ · channels)`` channels (the "C" of BC when < 1).
        drop_rate: dropout after each new feature map (the paper uses 0.2 only without augmentation).
    """

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 12,
        *,
        bottleneck: bool = False,
        compression: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: str | NormLayer | None = None,
        drop_rate: float = 0.0,
        num_blocks: int = 3,
    ) -> None:
        super().__init__()
        per_block, rest = divmod(depth - num_blocks - 1, num_blocks * (2 if bottleneck else 1))
        if rest or per_block < 1:
            raise ValueError(
                f"depth {depth} does not give whole dense blocks: need depth = {num_blocks}·m·"
                f"{2 if bottleneck else 1} + {num_blocks + 1} with m >= 1"
            )
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        norm = resolve_norm(norm_layer)
        channels = 2 * growth_rate if bottleneck else 16
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)
        bottleneck_width = 4 * growth_rate if bottleneck else None
        self.num_blocks = num_blocks
        for index in range(1, num_blocks + 1):
            layers = []
            for _ in range(per_block):
                layers.append(DenseLayer(channels, growth_rate, bottleneck_width, norm, drop_rate))
                channels += growth_rate
            setattr(self, f"block{index}", nn.Sequential(*layers))
            if index < num_blocks:
                out_channels = int(math.floor(compression * channels))
                setattr(self, f"trans{index}", Transition(channels, out_channels, norm))
                channels = out_channels
        self.norm = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, norm.modules)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features: the input of the classification layer."""
        x = self.conv1(x)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{index}")(x)
            if index < self.num_blocks:
                x = getattr(self, f"trans{index}")(x)
        return torch.flatten(self.avgpool(self.relu(self.norm(x))), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def densenet_parts(model: DenseNet) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stage<k>`` is dense block k plus the transition after it; ``classifier`` is the
    final norm before pooling (its output, after ReLU and pooling, is the classifier's input)."""
    parts: dict[str, tuple[str, ...]] = {}
    for index in range(1, model.num_blocks + 1):
        names = [f"block{index}"] + ([f"trans{index}"] if index < model.num_blocks else [])
        parts[f"stage{index}"] = tuple(names)
    parts["classifier"] = ("norm",)
    return parts


def densenet40_12(**kwargs) -> DenseNet:
    """DenseNet (L = 40, k = 12): 1.0M parameters with a 10-class head."""
    return DenseNet(40, 12, **kwargs)


def densenet_bc100_12(**kwargs) -> DenseNet:
    """DenseNet-BC (L = 100, k = 12, θ = 0.5): 0.8M parameters with a 10-class head."""
    return DenseNet(100, 12, bottleneck=True, compression=0.5, **kwargs)
