"""RegNetX-200MF and RegNetY-400MF (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020)
adapted to CIFAR, built with torchvision's ``RegNet`` class and its ``norm_layer`` argument.

Stage depths, widths, group width (8) and bottleneck ratio (1) are the paper's ImageNet models; RegNetY adds
squeeze-excitation with ratio 0.25 of the block input width. CIFAR adaptation: the stride-2 stem becomes a
3×3 stride-1 convolution with 64 channels, and the four stages use strides 1, 1, 2, 2 (32×32 → 8×8).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import torch.nn as nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.ops.misc import Conv2dNormActivation

from .._utils import NormLayer, init_weights, resolve_norm

__all__ = ["REGNET_CONFIGS", "cifar_regnet", "regnet_parts", "regnetx_200mf", "regnety_400mf"]

#: depths, widths, group width, bottleneck multiplier, squeeze-excitation ratio.
REGNET_CONFIGS: dict[str, dict] = {
    "regnetx_200mf": dict(depths=(1, 1, 4, 7), widths=(24, 56, 152, 368), group_width=8, bottleneck=1.0, se=None),
    "regnety_400mf": dict(depths=(1, 3, 6, 6), widths=(48, 104, 208, 440), group_width=8, bottleneck=1.0, se=0.25),
}


def _cifar_stem(
    width_in: int, width_out: int, norm_layer: Callable, activation: Callable, *, in_channels: int
) -> nn.Module:
    # torchvision passes width_in = 3; the real input channels come from the builder.
    return Conv2dNormActivation(
        in_channels, width_out, kernel_size=3, stride=1, norm_layer=norm_layer, activation_layer=activation
    )


def cifar_regnet(
    config: str | Mapping,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    norm_layer: str | NormLayer | None = None,
    stem_width: int = 64,
    strides: Sequence[int] = (1, 1, 2, 2),
) -> RegNet:
    """A torchvision ``RegNet`` with a CIFAR stem; ``config`` is a key of :data:`REGNET_CONFIGS` or a
    mapping with the same keys (depths, widths, group_width, bottleneck, se)."""
    if isinstance(config, str):
        if config not in REGNET_CONFIGS:
            raise ValueError(f"unknown RegNet config {config!r}; known: {', '.join(REGNET_CONFIGS)}")
        config = REGNET_CONFIGS[config]
    cfg = dict(config)
    stages = len(cfg["depths"])
    if len(strides) != stages:
        raise ValueError(f"strides {list(strides)} must give one stride per stage ({stages})")
    params = BlockParams(
        depths=list(cfg["depths"]),
        widths=list(cfg["widths"]),
        group_widths=[cfg["group_width"]] * stages,
        bottleneck_multipliers=[cfg["bottleneck"]] * stages,
        strides=list(strides),
        se_ratio=cfg["se"],
    )
    norm = resolve_norm(norm_layer)
    model = RegNet(
        params,
        num_classes=num_classes,
        stem_width=stem_width,
        stem_type=partial(_cifar_stem, in_channels=in_channels),
        norm_layer=norm,
    )
    init_weights(model, norm.modules)
    return model


def regnet_parts(model: RegNet) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stem``; ``stage<k>`` (``trunk_output.block<k>``); ``classifier``: the last norm of
    the last block (its output plus the identity, after ReLU and pooling, is the classifier's input)."""
    parts: dict[str, tuple[str, ...]] = {"stem": ("stem",)}
    stages = list(model.trunk_output.named_children())
    for index, (name, _) in enumerate(stages, start=1):
        parts[f"stage{index}"] = (f"trunk_output.{name}",)
    last_name, last_stage = stages[-1]
    block_name = list(last_stage.named_children())[-1][0]
    parts["classifier"] = (f"trunk_output.{last_name}.{block_name}.f.c.1",)
    return parts


def regnetx_200mf(**kwargs) -> RegNet:
    """RegNetX-200MF for CIFAR (depths 1/1/4/7, widths 24/56/152/368, group width 8)."""
    return cifar_regnet("regnetx_200mf", **kwargs)


def regnety_400mf(**kwargs) -> RegNet:
    """RegNetY-400MF for CIFAR (depths 1/3/6/6, widths 48/104/208/440, group width 8, SE 0.25)."""
    return cifar_regnet("regnety_400mf", **kwargs)
