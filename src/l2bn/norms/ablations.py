"""The paper's Table 3 ablations: L2BN's l2 step replaced by another per-sample normalization, then BN.

    LNBN: y = BN(LN(x)),   INBN: y = BN(IN(x)),   PNBN: y = BN(PN(x))
The first step has no affine parameters (LN/IN: biased variance; PN: unbiased variance over channels, as
:mod:`.positional`); BN is torch's, with its parameters, running statistics and state_dict keys, so a BN
checkpoint loads. Like L2BN these subclass ``_BatchNorm``: torch's ``SyncBatchNorm.convert_sync_batchnorm``
would turn them back into plain BN.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import check_rank, check_spatial_size
from .positional import positional_norm

__all__ = ["INBatchNorm", "LNBatchNorm", "PNBatchNorm"]


class _PreNormBatchNorm(_BatchNorm):
    """BatchNorm preceded by a parameter-free per-sample normalization (``_pre_norm``)."""

    _min_dim = 2

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        pre_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
    ) -> None:
        extra = {} if bias else {"bias": False}  # torch's BatchNorm keyword (older torch raises for it)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra)
        self.pre_eps = pre_eps

    def _check_input_dim(self, input: Tensor) -> None:
        check_rank(input, type(self).__name__, min_dim=self._min_dim)

    def _pre_norm(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return super().forward(self._pre_norm(input))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pre_eps={self.pre_eps}"


class LNBatchNorm(_PreNormBatchNorm):
    """LNBN: Layer Norm over (C, *spatial) of each sample without affine, then BN."""

    def _pre_norm(self, input: Tensor) -> Tensor:
        return F.group_norm(input, 1, eps=self.pre_eps)


class INBatchNorm(_PreNormBatchNorm):
    """INBN: Instance Norm without affine (per sample and channel, over positions), then BN."""

    _min_dim = 3

    def _pre_norm(self, input: Tensor) -> Tensor:
        check_spatial_size(input, type(self).__name__)
        return F.group_norm(input, input.shape[1], eps=self.pre_eps)


class PNBatchNorm(_PreNormBatchNorm):
    """PNBN: Positional Norm without affine (across channels at each position), then BN."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        if num_features < 2:
            raise ValueError(f"PNBatchNorm needs num_features >= 2 (unbiased variance over channels), got {num_features}")
        super().__init__(num_features, **kwargs)

    def _pre_norm(self, input: Tensor) -> Tensor:
        return positional_norm(input, self.pre_eps)
