"""BatchNorm ↔ L2BN conversion that keeps weights, statistics, mode, device and dtype; the module-swap helper.

What :func:`convert_to_l2bn` converts: ``nn.BatchNorm{1,2,3}d`` (also materialised ``nn.LazyBatchNorm*``,
which become plain BatchNorm after their first forward), ``nn.SyncBatchNorm`` (→
:class:`l2bn.SyncL2BatchNorm`) and timm's ``BatchNormAct2d`` (→ :class:`l2bn.norm_act.L2BatchNormAct2d`,
keeping its drop and activation). Any other BatchNorm — an unknown ``_BatchNorm`` subclass, an
uninitialised lazy one — is left as it is, with a warning naming it. L2BN cannot be folded into a
convolution (its per-sample norm depends on the input): ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and
fx/quantization fusion passes accept L2BN layers as BatchNorm and return wrong convolutions.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

__all__ = ["convert_to_l2bn", "convert_to_bn", "rebuild_norm", "swap_modules"]

BN_TO_L2BN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: L2BatchNorm1d,
    nn.BatchNorm2d: L2BatchNorm2d,
    nn.BatchNorm3d: L2BatchNorm3d,
}
L2BN_TO_BN: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in BN_TO_L2BN.items()}

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


def _timm_norm_act_types() -> tuple[type | None, type | None]:
    """(timm's BatchNormAct2d, l2bn's L2BatchNormAct2d) when timm is already imported, else (None, None)."""
    if "timm" not in sys.modules:
        return None, None
    from .norm_act import L2BatchNormAct2d, timm_batchnorm_act

    return timm_batchnorm_act(), L2BatchNormAct2d


def _to_l2bn(old: nn.Module, rescale: bool, l2_eps: float) -> nn.Module | None:
    """The L2BN counterpart of ``old``, or None when ``old`` is not a BatchNorm this converter knows."""
    kind = type(old)
    options = {"rescale": rescale, "l2_eps": l2_eps}
    if kind in BN_TO_L2BN:
        return rebuild_norm(old, BN_TO_L2BN[kind], **options)
    if kind is nn.SyncBatchNorm:
        from .distributed import SyncL2BatchNorm

        return rebuild_norm(old, SyncL2BatchNorm, process_group=old.process_group, **options)
    bn_act, l2bn_act = _timm_norm_act_types()
    if bn_act is not None and kind is bn_act:
        new = rebuild_norm(old, l2bn_act, apply_act=False, **options)
        new.drop, new.act = old.drop, old.act
        return new
    return None


def _to_bn(old: nn.Module) -> nn.Module | None:
    """The torch (or timm) BatchNorm counterpart of an L2BN layer, or None."""
    kind = type(old)
    if kind in L2BN_TO_BN:
        return rebuild_norm(old, L2BN_TO_BN[kind])
    from .distributed import SyncL2BatchNorm

    if kind is SyncL2BatchNorm:
        return rebuild_norm(old, nn.SyncBatchNorm, process_group=old.process_group)
    bn_act, l2bn_act = _timm_norm_act_types()
    if l2bn_act is not None and kind is l2bn_act:
        new = rebuild_norm(old, bn_act, apply_act=False)
        new.drop, new.act = old.drop, old.act
        return new
    return None


def _why_not_converted(module: nn.Module) -> str | None:
    """Why a BatchNorm-like layer that :func:`_to_l2bn` did not convert was left alone (None: not a BatchNorm)."""
    if type(module).__module__.split(".")[0] == "l2bn":  # L2BN itself and the zoo's norms are meant as they are
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return f"{type(module).__name__} is not initialised yet: run one forward pass first"
    if isinstance(module, _BatchNorm):
        return f"{type(module).__name__} is a BatchNorm subclass this converter does not know"
    return None


def convert_to_l2bn(
    module: nn.Module, *, include: NamePredicate | None = None, rescale: bool = True, l2_eps: float = 1e-12
) -> nn.Module:
    """Replace every BatchNorm in ``module`` by the matching L2BN layer, in place (see the module docstring
    for which kinds convert; others are left with a warning naming them).

    Args:
        include: predicate on the qualified module name (``"layer1.0.bn1"``; ``""`` for the root) choosing
            which layers convert; default all.
        rescale, l2_eps: passed to every new layer.

    Returns the module (a new one if the root itself is a BatchNorm).

    Example::

        >>> import torchvision
        >>> model = convert_to_l2bn(torchvision.models.resnet18())
        >>> type(model.bn1).__name__, type(model.layer1[0].bn2).__name__
        ('L2BatchNorm2d', 'L2BatchNorm2d')
    """
    skipped: list[str] = []

    def replace(name: str, child: nn.Module) -> nn.Module | None:
        if include is not None and not include(name):
            return None
        new = _to_l2bn(child, rescale, l2_eps)
        if new is None and (reason := _why_not_converted(child)) is not None:
            skipped.append(f"{name or '<root>'!r} ({reason})")
        return new

    module = swap_modules(module, replace)
    if skipped:
        names = ", ".join(skipped)
        warnings.warn(f"convert_to_l2bn left {len(skipped)} BatchNorm layer(s) unconverted: {names}", stacklevel=2)
    return module


def convert_to_bn(module: nn.Module, *, include: NamePredicate | None = None) -> nn.Module:
    """Reverse of :func:`convert_to_l2bn`: every L2BN layer becomes the matching torch (or timm) BatchNorm.

    The result is ordinary BatchNorm — foldable into convolutions with ``fuse_conv_bn_eval``, but no longer
    L2BN: its outputs differ (L2BN's per-sample scaling cannot be folded into fixed weights).
    """
    return swap_modules(module, lambda name, child: _to_bn(child) if include is None or include(name) else None)
