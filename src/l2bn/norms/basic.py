"""Per-sample normalizations as GroupNorm special cases: Layer Norm, Instance Norm, Group Norm by group width.

All three standardise each sample over a set of channels and all spatial positions with the biased variance,
then apply a per-channel affine (Ba et al. 2016; Ulyanov et al. 2016; Wu & He 2018). Expressing them through
``nn.GroupNorm`` keeps torch's kernels and lets one class accept (N, C), (N, C, L), (N, C, H, W), ... input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ._utils import check_rank, check_spatial_size

__all__ = ["GroupNormCPG", "InstanceNormNd", "LayerNormNd"]


class LayerNormNd(nn.GroupNorm):
    """Layer Norm over (C, *spatial) of each sample with a per-channel affine: GroupNorm with one group."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, num_features, eps=eps, affine=affine, device=device, dtype=dtype)

    @property
    def num_features(self) -> int:
        return self.num_channels


class InstanceNormNd(nn.GroupNorm):
    """Instance Norm with a per-channel affine and instance statistics in train and eval (no running stats).

    GroupNorm with one channel per group equals ``F.instance_norm`` without running statistics, and unlike
    ``nn.InstanceNorm1d/2d`` never mistakes a batched input for an unbatched one.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, num_features, eps=eps, affine=affine, device=device, dtype=dtype)

    @property
    def num_features(self) -> int:
        return self.num_channels

    def forward(self, input: Tensor) -> Tensor:
        check_rank(input, type(self).__name__, min_dim=3)
        check_spatial_size(input, type(self).__name__)
        return super().forward(input)


class GroupNormCPG(nn.GroupNorm):
    """Group Norm specified by channels per group (the paper's ``gn-cpg4``/``gn-cpg8``), per-channel affine."""

    def __init__(
        self,
        num_features: int,
        *,
        channels_per_group: int = 4,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if channels_per_group < 1 or num_features % channels_per_group != 0:
            raise ValueError(
                f"GroupNormCPG: num_features={num_features} is not divisible by channels_per_group="
                f"{channels_per_group}; use a channel count that is a multiple of {channels_per_group}"
            )
        self.channels_per_group = channels_per_group
        super().__init__(
            num_features // channels_per_group, num_features, eps=eps, affine=affine, device=device, dtype=dtype
        )

    @property
    def num_features(self) -> int:
        return self.num_channels

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels_per_group={self.channels_per_group}"
