"""Unified Batch Normalization (UBN; Wang, Zhang, Liu, Yan, arXiv 2311.15993) — a reconstruction.

The paper's full text was not available to us; this follows its abstract and is documented in docs/norms.md.
Stage 1, feature condensation threshold: in training, the layer measures how similar the samples of the
batch are, as the mean pairwise cosine similarity of their flattened features (see
:func:`feature_condensation`); when it exceeds ``condensation_threshold`` (τ) the batch is still normalised
with its own statistics but the running statistics are *not* updated from it.
Stage 2, centering and scaling calibration as in Representative BN (Gao et al., CVPR 2021):
    x_c = x + w_c ⊙ mean_pos(x)                          (w_c init 0)
    x̂   = (x_c − μ_B) / sqrt(σ²_B + ε)                   (batch stats in training, running stats in eval)
    y   = γ ⊙ x̂ ⊙ sigmoid(w_s ⊙ mean_pos(x̂) + b_s) + β   (w_s init 0, b_s init 1)
where mean_pos averages each sample's channel over its positions (the identity for (N, C) input).
Condensation is measured on x_c, the tensor whose statistics the running averages track.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import check_rank, factory_kwargs

__all__ = ["DEFAULT_CONDENSATION_THRESHOLD", "UnifiedBatchNorm", "feature_condensation"]

DEFAULT_CONDENSATION_THRESHOLD = 0.9
"""τ: a batch whose samples have mean pairwise cosine similarity above this does not update running stats."""


@torch.no_grad()
def feature_condensation(input: Tensor) -> Tensor | None:
    """Mean cosine similarity over distinct pairs of samples of ``input`` (N, *), in O(N·D); None if N < 2.

    With unit vectors u_n = x_n / ‖x_n‖, Σ_{m≠n} ⟨u_m, u_n⟩ = ‖Σ_n u_n‖² − Σ_n ‖u_n‖², divided by N(N−1)
    pairs. Σ‖u_n‖² is N except for all-zero samples, which count as orthogonal to everything. Float32 or wider.
    """
    n = input.shape[0]
    if n < 2:
        return None
    flat = input.detach().reshape(n, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    unit = F.normalize(flat, dim=1)
    total = unit.sum(dim=0)
    return (total.square().sum() - unit.square().sum()) / (n * (n - 1))


class UnifiedBatchNorm(nn.Module):
    """UBN (reconstruction) over (N, C, *) input; ``last_condensation`` holds the latest training-batch value.

    Buffers and their updates follow torch's BatchNorm (``running_mean``, unbiased ``running_var``,
    ``num_batches_tracked``; ``momentum=None`` is a cumulative average over the batches that updated),
    except that a condensed batch (condensation > τ) leaves all three untouched. The decision stays on the
    device (no host synchronisation).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        condensation_threshold: float = DEFAULT_CONDENSATION_THRESHOLD,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not -1.0 <= condensation_threshold <= 1.0:
            raise ValueError(
                f"condensation_threshold is a cosine similarity in [-1, 1], got {condensation_threshold}"
            )
        fk = factory_kwargs(device, dtype)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.condensation_threshold = condensation_threshold
        self.centering_weight = nn.Parameter(torch.empty(num_features, **fk))
        self.scaling_weight = nn.Parameter(torch.empty(num_features, **fk))
        self.scaling_bias = nn.Parameter(torch.empty(num_features, **fk))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **fk))
            self.bias = nn.Parameter(torch.empty(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_var", torch.ones(num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.last_condensation: Tensor | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.zeros_(self.centering_weight)
        nn.init.zeros_(self.scaling_weight)
        nn.init.ones_(self.scaling_bias)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        self.last_condensation = None

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int, update: Tensor) -> None:
        """Move the running statistics towards this batch's where ``update`` (a 0-d bool tensor) is true."""
        gate = update.to(self.running_mean.dtype)
        self.num_batches_tracked.add_(update.long())
        if self.momentum is None:
            factor = gate / self.num_batches_tracked.clamp(min=1).to(gate.dtype)
        else:
            factor = gate * self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

    def forward(self, input: Tensor) -> Tensor:
        check_rank(input, type(self).__name__)
        c = input.shape[1]
        shape = (1, c) + (1,) * (input.dim() - 2)
        pos_dims = tuple(range(2, input.dim()))
        stat_dims = (0, *pos_dims)

        pooled = input.mean(dim=pos_dims, keepdim=True) if pos_dims else input
        x = input + self.centering_weight.view(shape) * pooled

        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            count = input.numel() // c if c else 0
            if self.training and count <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
                )
            var, mean = torch.var_mean(x, dim=stat_dims, correction=0)
            if self.training:
                self.last_condensation = feature_condensation(x)
                if self.track_running_stats:
                    cond = self.last_condensation
                    update = (
                        torch.ones((), dtype=torch.bool, device=x.device)
                        if cond is None
                        else cond <= self.condensation_threshold
                    )
                    self._update_running_stats(mean.detach(), var.detach(), count, update)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)

        pooled_hat = x_hat.mean(dim=pos_dims, keepdim=True) if pos_dims else x_hat
        scale = torch.sigmoid(self.scaling_weight.view(shape) * pooled_hat + self.scaling_bias.view(shape))
        out = x_hat * scale
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, condensation_threshold={self.condensation_threshold}"
        )
