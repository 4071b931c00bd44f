"""Batch-Channel Normalization (Qiao, Wang, Liu, Shen, Yuille, arXiv 1903.10520, 2019).

BCN = BatchNorm (per-channel affine, running statistics) followed by a channel normalization: each sample's
channels are split into G groups, every group is standardised over its channels and positions (biased
variance, as Group Norm), and a *per-group* affine follows:
    z = BN_{γ_c, β_c}(x);   y[n, g] = a_g · (z[n, g] − μ[n, g]) / sqrt(σ²[n, g] + ε) + b_g.
Group count: the paper's rule G = min(32, C // 4). When C is not divisible by that target, we use the
largest divisor of C not above it (e.g. C = 200 → target 32 → G = 25), so every group is equally wide;
C < 8 gives G = 1. Pass ``num_groups`` to choose G yourself.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import BatchNormNd, check_rank, factory_kwargs

__all__ = ["BatchChannelNorm", "bcn_num_groups"]


def bcn_num_groups(num_features: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """The largest divisor of ``num_features`` not above ``min(max_groups, num_features // min_channels_per_group)``."""
    if num_features < 1:
        raise ValueError(f"num_features must be positive, got {num_features}")
    target = max(1, min(max_groups, num_features // min_channels_per_group))
    return next(g for g in range(target, 0, -1) if num_features % g == 0)


class BatchChannelNorm(nn.Module):
    """BCN over (N, C, *) input: BN with per-channel affine, then group standardisation with per-group affine.

    State: ``bn.*`` (a torch BatchNorm, synchronised by ``nn.SyncBatchNorm.convert_sync_batchnorm``) and the
    group affine ``weight``/``bias`` of shape (num_groups,).
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = factory_kwargs(device, dtype)
        if num_groups is None:
            num_groups = bcn_num_groups(num_features)
        elif num_groups < 1 or num_features % num_groups != 0:
            raise ValueError(
                f"BatchChannelNorm: num_groups={num_groups} must be a positive divisor of num_features={num_features}"
            )
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.bn = BatchNormNd(num_features, eps=eps, momentum=momentum, **fk)
        self.weight = nn.Parameter(torch.empty(num_groups, **fk))
        self.bias = nn.Parameter(torch.empty(num_groups, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        check_rank(input, type(self).__name__)
        out = self.bn(input)
        n = input.shape[0]
        grouped = out.reshape(n, self.num_groups, -1)
        grouped = F.layer_norm(grouped, grouped.shape[-1:], eps=self.eps)
        grouped = grouped * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)
        return grouped.view_as(input)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
