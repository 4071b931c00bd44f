"""The normalization zoo: every layer the paper compares with, by name (see ``registry``).

Every constructor is channels-first, ``(num_features, *, ..., device=None, dtype=None)``, so
``get_norm_layer(name)`` can be passed as torchvision's ``norm_layer``. Formulas and choices: docs/norms.md.
"""
from functools import partial

import torch.nn as nn

from ..layers import L2BatchNorm2d
from .ablations import INBatchNorm, LNBatchNorm, PNBatchNorm
from .basic import GroupNormCPG, InstanceNormNd, LayerNormNd
from .batch_channel import BatchChannelNorm, bcn_num_groups
from .batch_instance import BatchInstanceNorm, clip_gates_, gate_parameters, param_groups
from .positional import PositionalNorm, positional_norm
from .registry import create_norm, get_norm_layer, list_norms, register_norm
from .switchable import SwitchableNorm
from .unified import (
    UnifiedBatchNorm1d,
    UnifiedBatchNorm2d,
    UnifiedBatchNorm3d,
    condensation_summary,
    feature_condensation,
)

register_norm("bn", nn.BatchNorm2d)
register_norm("l2bn", L2BatchNorm2d)
register_norm("ln", LayerNormNd)
register_norm("in", InstanceNormNd)
register_norm("gn-cpg4", partial(GroupNormCPG, channels_per_group=4))
register_norm("gn-cpg8", partial(GroupNormCPG, channels_per_group=8))
register_norm("sn", SwitchableNorm)
register_norm("bcn", BatchChannelNorm)
register_norm("bin", BatchInstanceNorm)
register_norm("pn", PositionalNorm)
register_norm("lnbn", LNBatchNorm)
register_norm("inbn", INBatchNorm)
register_norm("pnbn", PNBatchNorm)
register_norm("ubn", UnifiedBatchNorm2d)

__all__ = [
    "BatchChannelNorm",
    "BatchInstanceNorm",
    "GroupNormCPG",
    "INBatchNorm",
    "InstanceNormNd",
    "LNBatchNorm",
    "LayerNormNd",
    "PNBatchNorm",
    "PositionalNorm",
    "SwitchableNorm",
    "UnifiedBatchNorm1d",
    "UnifiedBatchNorm2d",
    "UnifiedBatchNorm3d",
    "bcn_num_groups",
    "clip_gates_",
    "condensation_summary",
    "create_norm",
    "feature_condensation",
    "gate_parameters",
    "get_norm_layer",
    "list_norms",
    "param_groups",
    "positional_norm",
    "register_norm",
]
