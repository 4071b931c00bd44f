"""CIFAR ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017,
section 5.3): a 3×3 stem with 64 channels, three stages of three bottleneck blocks (depth 9·3 + 2 = 29)
with outputs 256/512/1024, projection shortcuts, cardinality C and bottleneck width d (grouped 3×3 of
C·d channels in the first stage, doubled per stage). Built from torchvision's ``Bottleneck``.
"""
from __future__ import annotations

from typing import Sequence

from torchvision.models.resnet import Bottleneck

from .resnet import CifarResNet

__all__ = ["resnext29", "resnext29_8x64d"]


def resnext29(
    cardinality: int,
    bottleneck_width: int,
    *,
    planes: Sequence[int] = (64, 128, 256),
    stem_width: int = 64,
    **kwargs,
) -> CifarResNet:
    """ResNeXt-29 (C × d) for CIFAR; torchvision's ``base_width`` equals ``d`` at ``planes`` = 64.

    ``planes`` / ``stem_width`` shrink the network (tests); the paper's values are the defaults.
    """
    kwargs.setdefault("shortcut", "B")
    return CifarResNet(
        Bottleneck,
        [3, 3, 3],
        planes=planes,
        stem_width=stem_width,
        groups=cardinality,
        width_per_group=bottleneck_width,
        **kwargs,
    )


def resnext29_8x64d(**kwargs) -> CifarResNet:
    """ResNeXt-29, 8×64d: 34.4M parameters with a 10-class head."""
    return resnext29(8, 64, **kwargs)
