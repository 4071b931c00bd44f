"""Switchable Normalization (Luo, Ren, Peng, Zhang, Li, ICLR 2019, arXiv 1806.10779).

Means and variances of Instance, Layer and Batch Norm are mixed by learned softmax weights:
    μ = Σ_k softmax(λ_μ)_k μ_k,   σ² = Σ_k softmax(λ_σ)_k σ²_k,   k ∈ {IN, LN, BN},
    y = γ ⊙ (x − μ) / sqrt(σ² + ε) + β.
Conventions matched to the authors' ``SwitchNorm2d`` (switchablenorms/Switchable-Normalization,
``devkit/ops/switchable_norm.py``), written independently here:
  * σ²_IN is the *unbiased* variance over the spatial positions of each (n, c);
  * LN and BN statistics are formed from IN statistics: μ_LN = mean_c μ_IN,
    σ²_LN = mean_c(σ²_IN + μ²_IN) − μ²_LN, and the same over n for BN;
  * the BN running statistics store exactly these μ_BN, σ²_BN (no Bessel factor);
  * eval: the BN term uses the running statistics, IN and LN always come from the current input;
  * ``momentum`` is torch's (weight of the new batch; the authors' 0.9 = our 0.1). ``momentum=None``
    is the authors' batch-average mode: running_mean = average of μ_BN and
    running_var = average of (μ²_BN + σ²_BN) − running_mean² over all batches seen.
Differences: running_var starts at 1 (torch's BN; the authors start at 0), there is ``affine`` and
``track_running_stats`` like torch's BN, and spatial size 1 is refused (the unbiased variance is undefined).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from ._utils import check_rank, check_spatial_size

__all__ = ["SwitchableNorm"]


class SwitchableNorm(_NormBase):
    """Switchable Norm over (N, C, L), (N, C, H, W), ... input; ``using_bn=False`` mixes only IN and LN.

    Built on torch's ``_NormBase``: BatchNorm's ``weight``/``bias``/running-statistics attributes, buffers,
    ``reset_running_stats`` and state_dict handling, plus the mixing weights ``mean_weight``/``var_weight``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        using_bn: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.using_bn = using_bn
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats and using_bn, device=device, dtype=dtype
        )
        num_terms = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(num_terms, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(num_terms, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()  # running statistics, weight = 1, bias = 0
        if hasattr(self, "mean_weight"):  # not yet during _NormBase.__init__
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)

    @torch.no_grad()
    def _update_running_stats(self, mean_bn: Tensor, var_bn: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        mean_bn = mean_bn.reshape(-1).to(self.running_mean.dtype)
        var_bn = var_bn.reshape(-1).to(self.running_var.dtype)
        if self.momentum is None:  # the authors' batch average: average first and second moments
            factor = 1.0 / float(self.num_batches_tracked)
            second = self.running_var + self.running_mean.square()
            second.lerp_(var_bn + mean_bn.square(), factor)
            self.running_mean.lerp_(mean_bn, factor)
            self.running_var.copy_(second - self.running_mean.square())
        else:
            self.running_mean.lerp_(mean_bn, self.momentum)
            self.running_var.lerp_(var_bn, self.momentum)

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_rank(input, name, min_dim=3)
        check_spatial_size(input, name)
        n, c = input.shape[:2]
        x = input.reshape(n, c, -1)
        var_in, mean_in = torch.var_mean(x, dim=-1, keepdim=True, correction=1)
        second_in = var_in + mean_in.square()
        mean_ln = mean_in.mean(dim=1, keepdim=True)
        var_ln = second_in.mean(dim=1, keepdim=True) - mean_ln.square()
        mean_w = torch.softmax(self.mean_weight, dim=0)
        var_w = torch.softmax(self.var_weight, dim=0)
        mean = mean_w[0] * mean_in + mean_w[1] * mean_ln
        var = var_w[0] * var_in + var_w[1] * var_ln
        if self.using_bn:
            if self.training or not self.track_running_stats:
                mean_bn = mean_in.mean(dim=0, keepdim=True)
                var_bn = second_in.mean(dim=0, keepdim=True) - mean_bn.square()
                if self.training and self.track_running_stats:
                    self._update_running_stats(mean_bn.detach(), var_bn.detach())
            else:
                mean_bn = self.running_mean.view(1, c, 1)
                var_bn = self.running_var.view(1, c, 1)
            mean = mean + mean_w[2] * mean_bn
            var = var + var_w[2] * var_bn
        out = ((x - mean) * torch.rsqrt(var + self.eps)).view_as(input)
        if self.affine:
            shape = (1, c) + (1,) * (input.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, using_bn={self.using_bn}"
        )
