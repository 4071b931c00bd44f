"""ImageNet ResNets and ResNeXts from torchvision's ``ResNet`` class and its ``norm_layer`` argument.

Never downloads weights (``weights`` is not accepted). ``resnext101_32x4d`` (Xie et al. 2017; 44.2M) has no
torchvision builder and is composed here from the same class: blocks [3, 4, 23, 3], 32 groups of width 4.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from ._utils import NormLayer, init_weights, resolve_norm

__all__ = [
    "IMAGENET_CONFIGS",
    "imagenet_resnet",
    "imagenet_resnet_parts",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "resnext101_32x4d",
]

#: blocks per stage, groups, width per group (all use torchvision's ``Bottleneck``).
IMAGENET_CONFIGS: dict[str, tuple[tuple[int, int, int, int], int, int]] = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
}


def imagenet_resnet(
    config: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    norm_layer: str | NormLayer | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """torchvision ``ResNet`` for ``config`` (a key of :data:`IMAGENET_CONFIGS`) with any norm layer.

    ``zero_init_residual`` zeroes the weight of each block's last norm (Goyal et al. 2017), if it has one.
    """
    if config not in IMAGENET_CONFIGS:
        raise ValueError(f"unknown ImageNet config {config!r}; known: {', '.join(IMAGENET_CONFIGS)}")
    layers, groups, width = IMAGENET_CONFIGS[config]
    norm = resolve_norm(norm_layer)
    model = ResNet(
        Bottleneck, list(layers), num_classes=num_classes, groups=groups, width_per_group=width, norm_layer=norm
    )
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    init_weights(model, norm.modules)
    if zero_init_residual:
        for module in model.modules():
            weight = getattr(module.bn3, "weight", None) if isinstance(module, Bottleneck) else None
            if isinstance(weight, nn.Parameter):
                nn.init.zeros_(weight)
    return model


def imagenet_resnet_parts(model: ResNet) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stem`` (bn1), ``stage1``–``stage4`` (layer1–4), ``classifier`` (last block's bn3)."""
    parts: dict[str, tuple[str, ...]] = {"stem": ("bn1",)}
    parts.update({f"stage{k}": (f"layer{k}",) for k in range(1, 5)})
    parts["classifier"] = (f"layer4.{len(model.layer4) - 1}.bn3",)
    return parts


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: 25.6M parameters with a 1000-class head."""
    return imagenet_resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: 44.5M parameters with a 1000-class head."""
    return imagenet_resnet("resnet101", **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 (32×4d): 25.0M parameters with a 1000-class head."""
    return imagenet_resnet("resnext50_32x4d", **kwargs)


def resnext101_32x4d(**kwargs) -> ResNet:
    """ResNeXt-101 (32×4d): 44.2M parameters with a 1000-class head."""
    return imagenet_resnet("resnext101_32x4d", **kwargs)
