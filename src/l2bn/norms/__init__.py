"""The normalization zoo: every layer the paper compares with, by name (see ``registry``)."""
import torch.nn as nn

from ..layers import L2BatchNorm2d
from .registry import create_norm, get_norm_layer, list_norms, register_norm

register_norm("bn", nn.BatchNorm2d)
register_norm("l2bn", L2BatchNorm2d)

__all__ = ["create_norm", "get_norm_layer", "list_norms", "register_norm"]
