"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

A 3×3 stem with 16 channels, three stages of ``n`` blocks at 16/32/64 channels (stride 1/2/2), global
average pooling and a linear classifier: depth 6n + 2. The blocks are torchvision's own ``BasicBlock`` and
``Bottleneck`` (which take ``norm_layer``), so the same class also builds the CIFAR ResNeXt.

Shortcuts when the shape changes: option ``"A"`` (the paper's CIFAR choice, parameter-free: subsample by the
stride and zero-pad the new channels) or ``"B"`` (1×1 projection convolution + norm).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck

from .._utils import NormLayer, init_weights, resolve_norm

__all__ = [
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet_parts",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

Block = type[BasicBlock] | type[Bottleneck]


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and append zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels}); use 'B'")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(nn.Module):
    """Three-stage ResNet for small images; ``norm_layer`` (registry name or callable) fills every norm.

    Args:
        block: torchvision's ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        planes: per-stage ``planes`` (output channels are ``planes * block.expansion``).
        stem_width: channels of the 3×3 stem convolution.
        groups, width_per_group: grouped-convolution settings of ``Bottleneck`` (ResNeXt).
        shortcut: ``"A"`` (zero-pad identity) or ``"B"`` (projection) where the shape changes.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        planes: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: str | NormLayer | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if len(layers) != len(planes):
            raise ValueError(f"layers {list(layers)} and planes {list(planes)} must have the same length")
        shortcut = shortcut.upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        norm = resolve_norm(norm_layer)
        self.shortcut = shortcut
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = stem_width
        for index, (blocks, width) in enumerate(zip(layers, planes)):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, width, blocks, stride, norm))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_weights(self, norm.modules)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, norm: Callable) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            if self.shortcut == "A":
                downsample = PadShortcut(self.inplanes, out_channels, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
                    norm(out_channels),
                )
        extra = {"groups": self.groups, "base_width": self.base_width}
        stage = [block(self.inplanes, planes, stride, downsample, norm_layer=norm, **extra)]
        self.inplanes = out_channels
        stage += [block(self.inplanes, planes, norm_layer=norm, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features: the input of the classification layer."""
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def cifar_resnet_parts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stem`` (bn1), ``stage<k>`` (layer<k>), ``classifier`` (last norm of last block)."""
    parts: dict[str, tuple[str, ...]] = {"stem": ("bn1",)}
    stage = 1
    while hasattr(model, f"layer{stage}"):
        parts[f"stage{stage}"] = (f"layer{stage}",)
        stage += 1
    last_stage = getattr(model, f"layer{stage - 1}")
    last_block = last_stage[-1]
    last_norm = "bn3" if isinstance(last_block, Bottleneck) else "bn2"
    parts["classifier"] = (f"layer{stage - 1}.{len(last_stage) - 1}.{last_norm}",)
    return parts


def _cifar_resnet(depth: int, **kwargs) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(BasicBlock, [n, n, n], **kwargs)


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n = 3), 0.27M parameters with a 10-class head."""
    return _cifar_resnet(20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (n = 5), 0.46M parameters with a 10-class head."""
    return _cifar_resnet(32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    """ResNet-44 (n = 7), 0.66M parameters with a 10-class head."""
    return _cifar_resnet(44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n = 9), 0.85M parameters with a 10-class head."""
    return _cifar_resnet(56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 (n = 18), 1.7M parameters with a 10-class head."""
    return _cifar_resnet(110, **kwargs)
