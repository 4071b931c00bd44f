"""A Lightning ``LayerSync`` plugin that synchronises L2BN across processes (and plain BatchNorm with it).

Lightning's ``Trainer(sync_batchnorm=True)`` calls torch's ``nn.SyncBatchNorm.convert_sync_batchnorm``, which
turns every L2BN layer (a ``_BatchNorm`` subclass) into a plain ``nn.SyncBatchNorm`` — silently dropping the
l2 step. :class:`SyncL2BN`, passed as a plugin instead, converts L2BN layers with :func:`l2bn.convert_sync_l2bn`
and plain ``BatchNorm{1,2,3}d`` layers with torch's converter when fitting starts, and reverts both when it
ends. Needs ``lightning`` (``pip install "l2bn[lightning]"``); see the Lightning docs on ``LayerSync`` plugins.
"""
from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import nn

from .convert import BN_TO_L2BN
from .distributed import convert_sync_l2bn, revert_sync_l2bn
from .surgery import rebuild_norm, swap_modules

__all__ = ["SyncL2BN"]

class SyncL2BN(LayerSync):
    """Synchronise L2BN (as :class:`l2bn.SyncL2BatchNorm`) and plain BatchNorm (as ``nn.SyncBatchNorm``) layers
    while a Lightning ``Trainer`` fits; no effect on one device.

    Args:
        process_group: the group statistics are reduced over (default: the whole world).

    Example::

        >>> from l2bn import L2BatchNorm2d
        >>> plugin = SyncL2BN()
        >>> net = plugin.apply(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), L2BatchNorm2d(8), torch.nn.BatchNorm2d(8)))
        >>> [type(m).__name__ for m in net][1:]
        ['SyncL2BatchNorm', 'SyncBatchNorm']
        >>> [type(m).__name__ for m in plugin.revert(net)][1:]
        ['L2BatchNorm2d', 'BatchNorm2d']

    Use it in place of ``sync_batchnorm=True`` (Lightning refuses both at once)::

        trainer = lightning.Trainer(strategy="ddp", devices=2, plugins=[SyncL2BN()])
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self._plain_types: dict[str, type[nn.Module]] = {}  # what each converted plain BN layer was

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert L2BN layers first (torch's converter would take them for plain BN), then plain BN layers."""
        model = convert_sync_l2bn(model, self.process_group)

        def plain_bn(name: str, child: nn.Module) -> nn.Module | None:
            if type(child) not in BN_TO_L2BN:  # exactly nn.BatchNorm{1,2,3}d
                return None
            self._plain_types[name] = type(child)
            return nn.SyncBatchNorm.convert_sync_batchnorm(child, self.process_group)

        return swap_modules(model, plain_bn)

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: every layer becomes the class it was converted from, parameters shared."""

        def plain_bn(name: str, child: nn.Module) -> nn.Module | None:
            if type(child) is not nn.SyncBatchNorm:
                return None
            return rebuild_norm(child, self._plain_types.get(name, nn.BatchNorm2d), share_parameters=True)

        return swap_modules(revert_sync_l2bn(model), plain_bn)
