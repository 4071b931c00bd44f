"""The O(N·C) algebra of the fused L2BN paths (torch ops, synchronized); see docs/algorithm.md.

The paths differ only in how they read the big tensors: per-(n, c) moments of x in forward, per-(n, c)
sums of dy and dy·(x − m) in backward. Everything between those reads and the final elementwise pass
lives here, once, as torch ops; the compiled CPU kernel and the Triton kernels compute the same formulas in
their own code (a small torch op per step would cost a launch each on a GPU), tested against these.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class BatchStatistics(NamedTuple):
    scale: Tensor  # r_n, shape (N,)
    norm: Tensor  # ‖x_n‖ unclamped, shape (N,)
    mean: Tensor  # μ_c of the normalised input, shape (C,)
    var: Tensor  # biased σ²_c of the normalised input, shape (C,)


def nan_as_inf(norm: Tensor) -> Tensor:
    """Sample norms with NaN (a sample holding inf or NaN, whose moments are inf − inf) read as inf: r_n = 0
    then, and only that value's channel gets NaN statistics, as in BatchNorm."""
    return torch.where(norm.isnan(), torch.full_like(norm, float("inf")), norm)


def sample_scales(mean: Tensor, sumsq: Tensor, spatial_size: int, *, rescale: bool, l2_eps: float) -> tuple[Tensor, Tensor]:
    """(r_n, ‖x_n‖) from per-(n, c) means m and centred sums of squares q: ‖x_n‖² = Σ_c (q + M·m²)."""
    norm = nan_as_inf((sumsq + spatial_size * mean.to(sumsq.dtype).square()).sum(dim=1).sqrt_())
    target = (mean.shape[1] * spatial_size) ** 0.5 if rescale else 1.0  # symbolic under dynamic shapes
    return target / norm.clamp_min(l2_eps), norm


def channel_statistics(mean: Tensor, sumsq: Tensor, spatial_size: int, *, rescale: bool, l2_eps: float) -> BatchStatistics:
    """Sample scales and the channel mean / biased variance of z = r_n x, pooled without cancellation.

    σ²_c = Σ_n r_n² q[n,c] / (N·M) + mean_n (r_n m[n,c] − μ_c)²  (Chan, Golub & LeVeque 1979).
    """
    scale, norm = sample_scales(mean, sumsq, spatial_size, rescale=rescale, l2_eps=l2_eps)
    scaled_mean = scale[:, None] * mean
    mu = scaled_mean.mean(dim=0)
    within = (scale.square() @ sumsq) / (mean.shape[0] * spatial_size)
    var = within + (scaled_mean - mu).square_().mean(dim=0)
    return BatchStatistics(scale, norm, mu, var)


class OutputCoefficients(NamedTuple):
    """y = x·scale[n, c] + shift[c]: the forward's single elementwise pass."""

    scale: Tensor  # r_n·γ_c·invstd_c, shape (N, C)
    shift: Tensor  # β_c − μ_c·γ_c·invstd_c, shape (C,)
    invstd: Tensor  # 1/sqrt(σ²_c + ε), shape (C,)


def output_coefficients(
    sample_scale: Tensor, mu: Tensor, weight: Tensor | None, bias: Tensor | None, *, var: Tensor | None = None,
    eps: float = 0.0, invstd: Tensor | None = None,
) -> OutputCoefficients:
    """The coefficients of y = γ·(r_n x − μ)·invstd + β, with invstd given or from ``var`` and ``eps``."""
    if invstd is None:
        invstd = (var + eps).rsqrt()
    gain = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mu * gain if bias is None else bias.to(invstd.dtype) - mu * gain
    return OutputCoefficients(sample_scale[:, None] * gain, shift, invstd)


def update_running_stats(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, count: float | Tensor, momentum: float
) -> None:
    """``F.batch_norm``'s update: the mean, and the unbiased variance var·count/(count − 1), by ``momentum``."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def synced_statistics(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, μ, biased σ²) per channel from all ranks' packed [count, Σz (C), Σz² (C)] float64 sums:
    E[z²] − E[z]² in float64 (docs/distributed.md; no count: zeros)."""
    num_channels = (sums.numel() - 1) // 2
    count, total, squares = sums[0], sums[1 : 1 + num_channels], sums[1 + num_channels :]
    mean = total / count.clamp_min(1)
    var = (squares / count.clamp_min(1) - mean.square()).clamp_min_(0)
    return count, mean, var


def check_synced_count(count: Tensor, input: Tensor) -> None:
    """BatchNorm's error when all ranks together gave at most one value per channel. Checked for CPU tensors
    only: on accelerators reading ``count`` would stall the stream (the variance is then NaN, as in torch)."""
    if count.device.type == "cpu" and count.item() <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training across ranks, got {int(count.item())} "
            f"in total (this rank's input size {tuple(input.shape)})"
        )


class InputGradient(NamedTuple):
    """Parameter gradients and the coefficients of dx = dy·dy_coef + x·x_coef + shift (all per (n, c))."""

    grad_weight: Tensor  # Σ dy·ẑ per channel (this process's share)
    grad_bias: Tensor  # Σ dy per channel (this process's share)
    dy_coef: Tensor
    x_coef: Tensor
    shift: Tensor


def input_gradient(
    dy_sum: Tensor,
    dy_xc: Tensor,
    *,
    centre: Tensor,
    sumsq: Tensor | None,
    scale: Tensor,
    norm: Tensor,
    mu: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    spatial_size: int,
    count: float | Tensor,
    l2_eps: float,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> InputGradient:
    """Backward of L2BN from the per-(n, c) sums Σ_S dy and Σ_S dy·(x − centre).

    ``sumsq`` (Σ_S (x − m)² with ``centre`` = m) given means batch statistics were used, whose gradient then
    flows too; None means fixed (running) statistics, with ``centre`` any per-(n, c) value (e.g. zeros).
    ``spatial_size`` is M = |S|; ``count`` is the number of values per channel the statistics were taken over (all ranks);
    ``all_reduce`` sums the packed [Σ dy, Σ dy·ẑ] channel vectors across ranks for synchronized BN.
    """
    r = scale[:, None]
    gain = invstd if weight is None else weight.to(invstd.dtype) * invstd
    zc = r * centre - mu  # per-(n, c) mean of z = r_n x, minus μ
    grad_bias = dy_sum.sum(dim=0)
    grad_weight = invstd * (r * dy_xc + zc * dy_sum).sum(dim=0)  # Σ dy·ẑ
    if sumsq is not None:  # batch statistics: dz = gain·(dy − Σdy/count − ẑ·Σdy·ẑ/count)
        total_bias, total_weight = grad_bias, grad_weight
        if all_reduce is not None:
            total_bias, total_weight = all_reduce(torch.cat([grad_bias, grad_weight])).chunk(2)
        k = gain * invstd * total_weight / count
        dz_sum = gain * dy_sum - spatial_size * (gain * total_bias / count + k * zc)
        dz_xc = gain * dy_xc - k * r * sumsq
        x_coef = -k * r
        shift = r * (k * mu - gain * total_bias / count)
    else:
        dz_sum, dz_xc = gain * dy_sum, gain * dy_xc
        x_coef = torch.zeros_like(dy_sum)
        shift = torch.zeros_like(dy_sum)
    # T_n = Σ_{c,S} dz·x; the l2 step adds −r_n x T_n / ‖x_n‖² (nothing where the norm was clamped)
    t = (dz_xc + centre * dz_sum).sum(dim=1)
    u = torch.where(norm > l2_eps, t / norm.square(), torch.zeros_like(t))[:, None]
    return InputGradient(grad_weight, grad_bias, (r * gain).expand_as(dy_sum), r * (x_coef - u), shift)
