"""Synchronized L2BN: :class:`SyncL2BatchNorm` and the converters to and from it.

The layer is the L2BN counterpart of ``nn.SyncBatchNorm``; its op (statistics and gradients all-reduced
across ranks, on any backend) is :func:`l2bn.kernels.sync.sync_l2_batch_norm`, kept apart as torch keeps
SyncBatchNorm's autograd Function apart from the module. Importing this module registers the
``nn.SyncBatchNorm`` ↔ :class:`SyncL2BatchNorm` pair with :func:`l2bn.convert_to_l2bn` / :func:`l2bn.convert_to_bn`.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .convert import register_conversion
from .kernels.sync import sync_l2_batch_norm
from .layers import STATE_NAMES, L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d, _L2BatchNorm, own_tensors
from .surgery import rebuild_norm, swap_modules

__all__ = ["SyncL2BatchNorm", "convert_sync_l2bn", "revert_sync_l2bn", "sync_l2_batch_norm"]


def _world_size(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class SyncL2BatchNorm(_L2BatchNorm):
    """L2BN with statistics synchronized over a process group — the L2BN counterpart of ``nn.SyncBatchNorm``.

    In training with an initialised group of more than one rank, the channel statistics of the
    l2-normalised input (and their gradients) are reduced across ranks: same output, input gradients and
    running statistics as one process on the concatenated batch. Otherwise (eval, one process) it is
    exactly :class:`l2bn.L2BatchNorm2d` and friends. Accepts any (N, C, *) input. Same state_dict as BN.

    Shape:
        input (N, C, *); output the same shape.

    Example::

        >>> model = convert_sync_l2bn(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), L2BatchNorm2d(8)))
        >>> type(model[1]).__name__
        'SyncL2BatchNorm'
        >>> model(torch.randn(4, 3, 6, 6)).shape  # one process: plain L2BN
        torch.Size([4, 8, 4, 4])
        >>> type(revert_sync_l2bn(model)[1]).__name__
        'L2BatchNorm2d'
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            bias=bias, rescale=rescale, l2_eps=l2_eps,
        )
        self.process_group = process_group
        self.local_cls: type[_L2BatchNorm] | None = None  # the layer it was converted from, for revert

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *) (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _world_size(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter = own_tensors(self, STATE_NAMES)
        factor = self._average_factor(input, counter)
        return sync_l2_batch_norm(
            input,
            running_mean if self.track_running_stats else None,
            running_var if self.track_running_stats else None,
            weight,
            bias,
            factor,
            self.eps,
            self.process_group,
            rescale=self.rescale,
            l2_eps=self.l2_eps,
        )


_LOCAL_TYPES = (L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d)


def _rebuild(old: _L2BatchNorm, new_cls: type[_L2BatchNorm], **extra: Any) -> _L2BatchNorm:
    """``new_cls`` with ``old``'s arguments and state, sharing its Parameters (like torch's SyncBN converter)."""
    return rebuild_norm(old, new_cls, share_parameters=True, rescale=old.rescale, l2_eps=old.l2_eps, **extra)


def convert_sync_l2bn(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``L2BatchNorm{1,2,3}d`` in ``module`` by :class:`SyncL2BatchNorm`, in place.

    Use this rather than ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would silently turn L2BN layers
    (subclasses of ``_BatchNorm``) into plain SyncBatchNorm. Parameters are shared, not copied, so an
    optimizer built before conversion still updates them. Returns the module (a new one if the root is L2BN).
    """

    skipped: list[str] = []

    def replace(name: str, child: nn.Module) -> nn.Module | None:
        if type(child) not in _LOCAL_TYPES:
            if isinstance(child, _L2BatchNorm) and not isinstance(child, SyncL2BatchNorm):
                skipped.append(f"{name or '<root>'!r} ({type(child).__name__})")
            return None
        new = _rebuild(child, SyncL2BatchNorm, process_group=process_group)
        new.local_cls = type(child)
        return new

    module = swap_modules(module, replace)
    if skipped:
        names = ", ".join(skipped)
        warnings.warn(f"convert_sync_l2bn left {len(skipped)} L2BN layer(s) unsynchronized: {names}", stacklevel=2)
    return module


def revert_sync_l2bn(module: nn.Module, default: type[_L2BatchNorm] = L2BatchNorm2d) -> nn.Module:
    """Reverse of :func:`convert_sync_l2bn`: every :class:`SyncL2BatchNorm` becomes a local L2BN layer, in place.

    Each layer becomes the class it was converted from; a SyncL2BatchNorm built directly (which does not
    know its input rank) becomes ``default``. Returns the module (a new one if the root is converted).
    """
    if default not in _LOCAL_TYPES:
        raise ValueError(f"default must be one of {[c.__name__ for c in _LOCAL_TYPES]}; got {default!r}")

    def replace(name: str, child: nn.Module) -> nn.Module | None:
        return _rebuild(child, child.local_cls or default) if isinstance(child, SyncL2BatchNorm) else None

    return swap_modules(module, replace)


register_conversion(
    nn.SyncBatchNorm, SyncL2BatchNorm,
    to_l2bn=lambda old, options: rebuild_norm(old, SyncL2BatchNorm, process_group=old.process_group, **options),
    to_bn=lambda old: rebuild_norm(old, nn.SyncBatchNorm, process_group=old.process_group),
)
