"""BatchNorm ↔ L2BN conversion that keeps weights, statistics, mode, device and dtype.

What :func:`convert_to_l2bn` converts: ``nn.BatchNorm{1,2,3}d`` (also materialised ``nn.LazyBatchNorm*``,
which become plain BatchNorm after their first forward), ``nn.SyncBatchNorm`` (→
:class:`l2bn.SyncL2BatchNorm`), torchvision's ``FrozenBatchNorm2d`` (→ :class:`l2bn.FrozenL2BatchNorm2d`) and
timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` (→ :mod:`l2bn.norm_act`'s counterparts, keeping their
drop and activation). Any other BatchNorm-like layer — an unknown ``_BatchNorm`` subclass, a layer with
``running_mean`` and ``running_var`` buffers, an uninitialised lazy one — is left as it is, with a warning
naming it. Other modules add their pairs with :func:`register_conversion` (:mod:`l2bn.distributed` does, for
SyncBatchNorm). L2BN cannot be folded into a convolution (its per-sample norm depends on the input): see
README's "Tools to avoid" for the fusion and reparameterisation tools that assume it can.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import FrozenL2BatchNorm2d, L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d, _L2BatchNorm
from .surgery import NamePredicate, Replacement, batchnorm_arguments, rebuild_norm, swap_modules  # noqa: F401

__all__ = [
    "BN_TO_L2BN", "FOLDING_METHODS", "FoldingRefused", "convert_to_bn", "convert_to_l2bn", "rebuild_norm", "register_conversion", "swap_modules",
    "unconverted_batchnorms",
]

BN_TO_L2BN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: L2BatchNorm1d,
    nn.BatchNorm2d: L2BatchNorm2d,
    nn.BatchNorm3d: L2BatchNorm3d,
}

ToL2BN = Callable[[nn.Module, dict[str, Any]], nn.Module]  # (BN layer, {rescale, l2_eps}) -> L2BN layer
ToBN = Callable[[nn.Module], nn.Module]
_TO_L2BN: dict[type[nn.Module], ToL2BN] = {}
_TO_BN: dict[type[nn.Module], ToBN] = {}


def register_conversion(
    bn_cls: type[nn.Module], l2bn_cls: type[nn.Module], *, to_l2bn: ToL2BN | None = None, to_bn: ToBN | None = None
) -> None:
    """Teach :func:`convert_to_l2bn` to turn ``bn_cls`` layers into ``l2bn_cls`` and :func:`convert_to_bn` back.

    The default rules rebuild the layer with :func:`l2bn.surgery.rebuild_norm` (BatchNorm's arguments and
    state); pass ``to_l2bn(old, options)`` (``options``: ``rescale`` and ``l2_eps``) or ``to_bn(old)`` for
    layers that need more. Exact types only: subclasses are not matched.
    """
    _TO_L2BN[bn_cls] = to_l2bn or (lambda old, options: rebuild_norm(old, l2bn_cls, **options))
    _TO_BN[l2bn_cls] = to_bn or (lambda old: rebuild_norm(old, bn_cls))


for _bn, _l2bn in BN_TO_L2BN.items():
    register_conversion(_bn, _l2bn)


def _register_optional_libraries() -> None:
    """Register the torchvision and timm pairs once those libraries are imported (l2bn never imports them)."""
    if "torchvision" in sys.modules:
        from torchvision.ops.misc import FrozenBatchNorm2d

        if FrozenBatchNorm2d not in _TO_L2BN:
            register_conversion(
                FrozenBatchNorm2d, FrozenL2BatchNorm2d,
                to_l2bn=lambda old, options: FrozenL2BatchNorm2d.from_frozen(old, **options),
                to_bn=lambda old: old.to_frozen(FrozenBatchNorm2d),
            )
    if "timm" in sys.modules:
        from .norm_act import timm_conversions

        for bn_cls, l2bn_cls, to_l2bn, to_bn in timm_conversions():
            if bn_cls not in _TO_L2BN:
                register_conversion(bn_cls, l2bn_cls, to_l2bn=to_l2bn, to_bn=to_bn)


FOLDING_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls
_L2BN_LAYERS = (_L2BatchNorm, FrozenL2BatchNorm2d)


class FoldingRefused:
    """Stands in for a block's ``fuse``/``reparameterize`` method once the block holds L2BN (RepVGG, MobileOne,
    FastViT, … fold their BatchNorms into convolutions for inference; a per-sample norm cannot be folded)."""

    def __init__(self, block: str, method: str) -> None:
        self.block, self.method = block, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{self.block}.{self.method}() would fold its L2BN layers into fixed convolution weights, but L2BN "
            "scales every sample by its own norm, which depends on the input, so it cannot be folded: the result "
            "would compute something else. Keep the block unfused, or convert_to_bn first (plain BatchNorm, "
            "different outputs)."
        )


def _guard_folding(module: nn.Module) -> None:
    """Make every block that could fold an L2BN layer refuse to (``convert_to_bn`` lifts the guard)."""
    for name, block in module.named_modules():
        methods = [m for m in FOLDING_METHODS if callable(getattr(type(block), m, None))]
        holds_l2bn = methods and any(isinstance(layer, _L2BN_LAYERS) for layer in block.modules())
        for method in methods:
            if holds_l2bn:
                block.__dict__[method] = FoldingRefused(f"{type(block).__name__} {name or '<root>'!r}", method)
            elif isinstance(block.__dict__.get(method), FoldingRefused):
                del block.__dict__[method]


def _why_not_converted(module: nn.Module) -> str | None:
    """Why a BatchNorm-like layer no conversion matched was left alone (None: not a BatchNorm, or l2bn's own)."""
    if type(module).__module__.split(".")[0] == "l2bn":  # L2BN itself and the zoo's norms are meant as they are
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return f"{type(module).__name__} is not initialised yet: run one forward pass first"
    if isinstance(module, _BatchNorm):
        return f"{type(module).__name__} is a BatchNorm subclass this converter does not know"
    buffers = dict(module.named_buffers(recurse=False))
    if "running_mean" in buffers and "running_var" in buffers:
        return f"{type(module).__name__} keeps BatchNorm statistics but is a layer this converter does not know"
    return None


def unconverted_batchnorms(module: nn.Module) -> list[str]:
    """``"name (reason)"`` for every BatchNorm-like layer in ``module`` that is not L2BN (empty: fully converted)."""
    _register_optional_libraries()
    found: list[str] = []
    for name, child in module.named_modules():
        if type(child) in _TO_L2BN:
            found.append(f"{name or '<root>'!r} ({type(child).__name__}, which convert_to_l2bn converts)")
        elif (reason := _why_not_converted(child)) is not None:
            found.append(f"{name or '<root>'!r} ({reason})")
    return found


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
    _register_optional_libraries()
    options = {"rescale": rescale, "l2_eps": l2_eps}
    skipped: list[str] = []

    def replace(name: str, child: nn.Module) -> nn.Module | None:
        if include is not None and not include(name):
            return None
        rule = _TO_L2BN.get(type(child))
        if rule is not None:
            return rule(child, options)
        if (reason := _why_not_converted(child)) is not None:
            skipped.append(f"{name or '<root>'!r} ({reason})")
        return None

    module = swap_modules(module, replace)
    _guard_folding(module)
    if skipped:
        names = ", ".join(skipped)
        warnings.warn(f"convert_to_l2bn left {len(skipped)} BatchNorm layer(s) unconverted: {names}", stacklevel=2)
    return module


def convert_to_bn(module: nn.Module, *, include: NamePredicate | None = None) -> nn.Module:
    """Reverse of :func:`convert_to_l2bn`: every L2BN layer becomes the matching torch (or timm, torchvision) one.

    The result is ordinary BatchNorm — foldable into convolutions with ``fuse_conv_bn_eval``, but no longer
    L2BN: its outputs differ (L2BN's per-sample scaling cannot be folded into fixed weights).
    """
    _register_optional_libraries()

    def replace(name: str, child: nn.Module) -> nn.Module | None:
        rule = _TO_BN.get(type(child))
        return rule(child) if rule is not None and (include is None or include(name)) else None

    module = swap_modules(module, replace)
    _guard_folding(module)
    return module
