"""Unified Batch Normalization (UBN; Wang, Zhang, Liu, Yan, arXiv 2311.15993) as its public code defines it.

The rule follows ``UnifiedBatchNorm2d`` in ``mmdet/models/utils/UBN.py`` of github.com/aHapBean/UBN_mmdectection
(written independently; differences in docs/norms.md). For input x of shape (N, C, *P):

Stage 1, feature condensation. In training, c = mean cosine similarity over the distinct pairs of the first
``condensation_samples`` samples of x, each flattened over (C, *P) (c = 1 for one sample), and the moving value
m ← (1 − α)·m + α·c (``running_condensation``, starts at 1). If m > τ (strict) the layer normalises with batch
statistics and updates the running ones as BatchNorm does; otherwise it normalises with the running statistics
and leaves them unchanged. ``num_batches_tracked`` counts every training batch.

Stage 2, calibration around a BatchNorm without γ, β; mean_P averages each sample's channel over positions:
    x_c = x + w_c ⊙ mean_P(x)                                    (``center_weight``, init 0)
    x̂   = (x_c − μ) / sqrt(σ² + ε)
    y   = sigmoid(w_s ⊙ mean_P(x̂) + b_s) ⊙ DWConv_k(x̂)          (``scale_weight`` 0, ``scale_bias`` 1)
DWConv_k is a depthwise k×k convolution with bias (``affine_conv``); with ``affine=False`` it is the identity.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ._utils import factory_kwargs

__all__ = [
    "UnifiedBatchNorm1d",
    "UnifiedBatchNorm2d",
    "UnifiedBatchNorm3d",
    "condensation_summary",
    "feature_condensation",
]

_NORM_EPS = 1e-8  # floor of a sample's norm in the cosine similarity (torch.nn.functional.cosine_similarity's)


@torch.no_grad()
def feature_condensation(input: Tensor, max_samples: int = 16) -> Tensor:
    """Mean cosine similarity over ordered pairs of distinct samples among the first ``max_samples`` of ``input``.

    ``input`` is (N, *), N ≥ 1; a 0-d tensor, 1 for a single sample, float32 or wider. O(N·D): with unit
    vectors u_n = x_n / max(‖x_n‖, 1e-8), Σ_{m≠n} ⟨u_m, u_n⟩ = ‖Σ_n u_n‖² − Σ_n ‖u_n‖², over N(N − 1) pairs.
    """
    flat = input.detach()[:max_samples]
    n = flat.shape[0]
    if n == 0:
        raise ValueError("feature_condensation needs at least one sample, got input of shape "
                         f"{tuple(input.shape)}")
    flat = flat.reshape(n, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    if n == 1:
        return flat.new_ones(())
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return (unit.sum(dim=0).square().sum() - unit.square().sum()) / (n * (n - 1))


class _UnifiedBatchNorm(nn.Module):
    """UBN over (N, C, *P) input with a depthwise convolution of rank |P| (set by the subclasses)."""

    _conv: type[nn.Module]

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        condensation_threshold: float = 0.15,
        condensation_momentum: float = 0.1,
        condensation_samples: int = 16,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not -1.0 <= condensation_threshold <= 1.0:
            raise ValueError(
                f"{name}: condensation_threshold is a cosine similarity in [-1, 1], got {condensation_threshold}"
            )
        if not 0.0 <= condensation_momentum <= 1.0:
            raise ValueError(f"{name}: condensation_momentum must be in [0, 1], got {condensation_momentum}")
        if condensation_samples < 1:
            raise ValueError(f"{name}: condensation_samples must be a positive int, got {condensation_samples}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"{name}: kernel_size must be odd and positive (the output keeps the input's size), got {kernel_size}"
            )
        fk = factory_kwargs(device, dtype)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.condensation_threshold = condensation_threshold
        self.condensation_momentum = condensation_momentum
        self.condensation_samples = condensation_samples
        self.kernel_size = kernel_size
        self.center_weight = nn.Parameter(torch.empty(num_features, **fk))
        self.scale_weight = nn.Parameter(torch.empty(num_features, **fk))
        self.scale_bias = nn.Parameter(torch.empty(num_features, **fk))
        if affine:
            self.affine_conv = self._conv(
                num_features, num_features, kernel_size, padding=kernel_size // 2, groups=num_features, bias=True, **fk
            )
        else:
            self.register_module("affine_conv", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_var", torch.ones(num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer("running_condensation", torch.ones(1, **fk))
        self._reset_own_parameters()  # the convolution keeps the init its constructor just drew

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1, batch count 0, moving condensation 1."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
        self.running_condensation.fill_(1)

    def _reset_own_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.zeros_(self.center_weight)
        nn.init.zeros_(self.scale_weight)
        nn.init.ones_(self.scale_bias)

    def reset_parameters(self) -> None:
        """The initial state: running statistics, calibration weights, and torch's default convolution init."""
        self._reset_own_parameters()
        if self.affine_conv is not None:
            self.affine_conv.reset_parameters()

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def epoch_summary(layers: Sequence[_UnifiedBatchNorm]) -> dict[str, float]:
        """The per-epoch state of a model's UBN ``layers`` (the protocol a training loop collects: one call for
        all layers sharing this function): mean moving condensation and the fraction of layers gated."""
        device = layers[0].running_condensation.device
        values = torch.stack([m.running_condensation.detach().reshape(()).to(device, torch.float64) for m in layers])
        gated = torch.stack([m.gated.to(device) for m in layers])
        mean, fraction = torch.stack([values.mean(), gated.double().mean()]).tolist()
        return {"ubn_condensation": mean, "ubn_gated": fraction}

    @property
    def gated(self) -> Tensor:
        """0-d bool tensor: the moving condensation is at or below the threshold (running statistics in use)."""
        return (self.running_condensation <= self.condensation_threshold).squeeze(0)

    @torch.no_grad()
    def _update_condensation(self, input: Tensor) -> None:
        value = feature_condensation(input, self.condensation_samples).to(self.running_condensation.dtype)
        alpha = self.condensation_momentum
        self.running_condensation.copy_((1.0 - alpha) * self.running_condensation + alpha * value)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int, use_batch: Tensor) -> None:
        """BatchNorm's update (unbiased variance; ``momentum=None``: cumulative average) where ``use_batch``."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1))
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
            moved = (1 - factor) * running + factor * batch.to(running.dtype)
            running.copy_(torch.where(use_batch, moved, running))

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and variance to normalise ``x`` with; moves the running statistics in training."""
        if self.track_running_stats and not self.training:
            return self.running_mean, self.running_var
        count = x.numel() // x.shape[1]
        stat_dims = (0, *range(2, x.dim()))
        if not self.track_running_stats:  # nothing to freeze to: batch statistics, as BatchNorm
            self._check_count(count, x)
            var, mean = torch.var_mean(x, dim=stat_dims, correction=0)
            return mean, var
        use_batch = ~self.gated  # decided on the device
        if count <= 1:  # batch statistics undefined: only the gated state can proceed (one host read, this case only)
            if bool(use_batch):
                self._check_count(count, x)
            self.num_batches_tracked.add_(1)
            return self.running_mean, self.running_var
        var, mean = torch.var_mean(x, dim=stat_dims, correction=0)
        used = torch.where(use_batch, mean, self.running_mean), torch.where(use_batch, var, self.running_var)
        self._update_running_stats(mean.detach(), var.detach(), count, use_batch)
        return used

    def _check_count(self, count: int, x: Tensor) -> None:
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input with {input.shape[1]} channels")
        x = input.unsqueeze(-1) if input.dim() == 2 else input  # (N, C) is one position
        pos_dims = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(pos_dims)
        if self.training:
            if x.shape[0] == 0:
                raise ValueError(
                    f"{type(self).__name__} needs at least one sample in training, got {tuple(input.shape)}"
                )
            self._update_condensation(x)
        x = x + self.center_weight.view(shape) * x.mean(dim=pos_dims, keepdim=True)
        mean, var = self._statistics(x)
        x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        scale = torch.sigmoid(self.scale_weight.view(shape) * x_hat.mean(dim=pos_dims, keepdim=True)
                              + self.scale_bias.view(shape))
        out = scale * (x_hat if self.affine_conv is None else self.affine_conv(x_hat))
        return out.squeeze(-1) if input.dim() == 2 else out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, condensation_threshold={self.condensation_threshold}, "
            f"condensation_momentum={self.condensation_momentum}, condensation_samples={self.condensation_samples}, "
            f"kernel_size={self.kernel_size}"
        )


class UnifiedBatchNorm1d(_UnifiedBatchNorm):
    """UBN for (N, C) or (N, C, L) input; depthwise ``nn.Conv1d`` affine ((N, C) is one position).

    Example: ``UnifiedBatchNorm1d(64)(torch.randn(8, 64, 100))``.
    """

    _conv = nn.Conv1d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"UnifiedBatchNorm1d expects 2D (N, C) or 3D (N, C, L) input, got {input.dim()}D "
                             f"input {tuple(input.shape)}")


class UnifiedBatchNorm2d(_UnifiedBatchNorm):
    """UBN for (N, C, H, W) input with a depthwise k×k ``nn.Conv2d`` affine (the reference's layer).

    Example: ``torchvision.models.resnet18(norm_layer=UnifiedBatchNorm2d)``.
    """

    _conv = nn.Conv2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"UnifiedBatchNorm2d expects 4D input (N, C, H, W), got {input.dim()}D input "
                             f"{tuple(input.shape)} (UnifiedBatchNorm1d/3d take 2D, 3D / 5D input)")


class UnifiedBatchNorm3d(_UnifiedBatchNorm):
    """UBN for (N, C, D, H, W) input with a depthwise k×k×k ``nn.Conv3d`` affine.

    Example: ``UnifiedBatchNorm3d(16)(torch.randn(2, 16, 4, 8, 8))``.
    """

    _conv = nn.Conv3d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"UnifiedBatchNorm3d expects 5D input (N, C, D, H, W), got {input.dim()}D input "
                             f"{tuple(input.shape)}")


def condensation_summary(model: nn.Module) -> dict[str, float]:
    """Mean moving condensation over ``model``'s UBN layers and the fraction of them gated (m ≤ τ).

    ``{"ubn_condensation": mean, "ubn_gated": fraction}``; ``{}`` for a model without UBN layers. One host
    read for all layers, so it suits a per-epoch log.
    """
    layers = [m for m in model.modules() if isinstance(m, _UnifiedBatchNorm)]
    return _UnifiedBatchNorm.epoch_summary(layers) if layers else {}
