"""Recursive BatchNorm ↔ L2BN conversion that keeps weights, statistics, mode, device and dtype."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

__all__ = ["convert_to_l2bn", "convert_to_bn"]

BN_TO_L2BN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: L2BatchNorm1d,
    nn.BatchNorm2d: L2BatchNorm2d,
    nn.BatchNorm3d: L2BatchNorm3d,
}
L2BN_TO_BN: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in BN_TO_L2BN.items()}

NamePredicate = Callable[[str], bool]


def rebuild_norm(old: nn.Module, new_cls: type[nn.Module], *, share_parameters: bool = False, **extra) -> nn.Module:
    """``new_cls`` with ``old``'s BatchNorm arguments (plus ``extra``), state, requires_grad flags and mode.

    ``share_parameters`` reuses ``old``'s weight and bias Parameters (as torch's SyncBatchNorm converter
    does, so an optimizer built before the conversion keeps updating them); otherwise they are copied.
    """
    tensor = next(iter(old.parameters()), None)
    if tensor is None:
        tensor = old.running_mean
    factory = {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}
    new = new_cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, **factory, **extra)
    if share_parameters and old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.load_state_dict(old.state_dict())
    for name, param in new.named_parameters():
        param.requires_grad_(getattr(old, name).requires_grad)
    new.train(old.training)
    return new


def _convert(module: nn.Module, mapping: dict, include: NamePredicate | None, prefix: str, **extra) -> nn.Module:
    new_cls = mapping.get(type(module))
    if new_cls is not None and (include is None or include(prefix)):
        return rebuild_norm(module, new_cls, **extra)
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        converted = _convert(child, mapping, include, qualified, **extra)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_to_l2bn(
    module: nn.Module, *, include: NamePredicate | None = None, rescale: bool = True, l2_eps: float = 1e-12
) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` in ``module`` by the matching L2BN layer, in place.

    ``include`` is an optional predicate on the qualified module name (``"layer1.0.bn1"``; ``""`` for
    the root) selecting which layers to convert. Returns the module (a new one if the root is a BN).
    """
    return _convert(module, BN_TO_L2BN, include, "", rescale=rescale, l2_eps=l2_eps)


def convert_to_bn(module: nn.Module, *, include: NamePredicate | None = None) -> nn.Module:
    """Reverse of :func:`convert_to_l2bn`: every L2BN layer becomes the matching torch BatchNorm."""
    return _convert(module, L2BN_TO_BN, include, "")
