"""Positional Normalization (Li, Yang, Belongie, Weinberger, NeurIPS 2019, "PONO").

At every position of every sample the C channel values are standardised:
    y[n, :, p] = γ ⊙ (x[n, :, p] − μ[n, p]) / sqrt(σ²[n, p] + ε) + β,
    μ, σ² = mean and *unbiased* variance over the channel dimension (the authors' code uses ``Tensor.var``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ._utils import check_rank, factory_kwargs

__all__ = ["PositionalNorm", "positional_norm"]


def positional_norm(input: Tensor, eps: float = 1e-5) -> Tensor:
    """PONO without affine on (N, C, *) input: per-position mean and unbiased std across channels."""
    if input.shape[1] < 2:
        raise ValueError(f"positional_norm needs at least 2 channels for the unbiased variance, got {input.shape[1]}")
    var, mean = torch.var_mean(input, dim=1, keepdim=True, correction=1)
    return (input - mean) * torch.rsqrt(var + eps)


class PositionalNorm(nn.Module):
    """Positional Normalization with a per-channel affine; defined for (N, C) and (N, C, *spatial) input."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 2:
            raise ValueError(f"PositionalNorm needs num_features >= 2 (unbiased variance over channels), got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs(device, dtype)))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs(device, dtype)))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        check_rank(input, type(self).__name__)
        out = positional_norm(input, self.eps)
        if self.affine:
            shape = (1, -1) + (1,) * (input.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
