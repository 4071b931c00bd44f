"""L2BN modules: BatchNorm's constructor, parameters, buffers and state_dict keys, with the l2 step first."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import l2_batch_norm

__all__ = ["L2BatchNorm1d", "L2BatchNorm2d", "L2BatchNorm3d"]


class _L2BatchNorm(_BatchNorm):
    """Shared implementation; subclasses only check the input rank.

    Subclassing ``_BatchNorm`` keeps every attribute, buffer and state_dict key of torch's BatchNorm, so
    checkpoints load both ways. It also means torch's ``SyncBatchNorm.convert_sync_batchnorm`` (and timm's
    freeze helpers) would treat these layers as plain BatchNorm: use :func:`l2bn.convert_sync_l2bn`.
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.rescale = rescale
        self.l2_eps = l2_eps

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")

    def _average_factor(self) -> float:
        """Momentum of this step's running-statistics update (cumulative average when momentum is None)."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self._average_factor()
        use_batch_stats = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        return l2_batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            rescale=self.rescale,
            l2_eps=self.l2_eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rescale={self.rescale}, l2_eps={self.l2_eps}"


class L2BatchNorm1d(_L2BatchNorm):
    """L2BN over (N, C) or (N, C, L) input, like :class:`torch.nn.BatchNorm1d`."""

    _expected_dims = (2, 3)


class L2BatchNorm2d(_L2BatchNorm):
    """L2BN over (N, C, H, W) input, like :class:`torch.nn.BatchNorm2d`."""

    _expected_dims = (4,)


class L2BatchNorm3d(_L2BatchNorm):
    """L2BN over (N, C, D, H, W) input, like :class:`torch.nn.BatchNorm3d`."""

    _expected_dims = (5,)
