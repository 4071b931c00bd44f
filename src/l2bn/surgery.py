"""Module surgery: swap submodules by a rule, and rebuild a BatchNorm-like layer as another class.

The converters (:mod:`l2bn.convert`, :mod:`l2bn.distributed`), the models and the training runner all
replace norm layers in a built network; this module holds the two steps they share.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NamePredicate", "Replacement", "batchnorm_arguments", "rebuild_norm", "swap_modules"]

NamePredicate = Callable[[str], bool]
Replacement = Callable[[str, nn.Module], "nn.Module | None"]


def swap_modules(module: nn.Module, replace: Replacement) -> nn.Module:
    """Walk ``module``'s tree; wherever ``replace(qualified_name, child)`` returns a module, put it in the
    child's place (without descending into it). The root's name is ``""``. Returns ``module``, or the
    root's replacement.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> net = swap_modules(net, lambda name, m: nn.GELU() if isinstance(m, nn.ReLU) else None)
        >>> net[1]
        GELU(approximate='none')
    """

    def visit(child: nn.Module, name: str) -> nn.Module:
        new = replace(name, child)
        if new is not None:
            return new
        for child_name, grandchild in child.named_children():
            converted = visit(grandchild, f"{name}.{child_name}" if name else child_name)
            if converted is not grandchild:
                setattr(child, child_name, converted)
        return child

    return visit(module, "")


def batchnorm_arguments(norm: _BatchNorm) -> dict[str, Any]:
    """The constructor arguments of a BatchNorm-like layer (``bias=False`` only where it has none)."""
    args: dict[str, Any] = dict(
        num_features=norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    if norm.affine and norm.bias is None:
        args["bias"] = False
    return args


def rebuild_norm(old: nn.Module, new_cls: type[nn.Module], *, share_parameters: bool = False, **extra) -> nn.Module:
    """``new_cls`` with ``old``'s BatchNorm arguments (plus ``extra``), state, requires_grad flags and mode.

    ``share_parameters`` reuses ``old``'s weight and bias Parameters (as torch's SyncBatchNorm converter
    does, so an optimizer built before the conversion keeps updating them); otherwise they are copied.
    """
    tensor = next(iter(old.parameters()), None)
    if tensor is None:
        tensor = old.running_mean
    factory = {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}
    new = new_cls(**batchnorm_arguments(old), **factory, **extra)
    if share_parameters and old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.load_state_dict(old.state_dict())
    for name, param in new.named_parameters():
        param.requires_grad_(getattr(old, name).requires_grad)
    new.train(old.training)
    return new
