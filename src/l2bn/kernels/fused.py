"""Fused L2BN over torch ops: one statistics read, one output pass, BatchNorm's saved tensors.

Notation (see docs/algorithm.md): x has shape (N, C, *S), M = |S|, D = C·M. For every (n, c) we
take the mean m and centred second moment v of x over S in one Welford pass (``torch.var_mean``).
From those, with no cancellation-prone subtraction:

    ‖x_n‖² = M · Σ_c (v[n,c] + m[n,c]²)          r_n = sqrt(D) / max(‖x_n‖, ε_l2)
    μ_c    = mean_n r_n m[n,c]                     (the normalised tensor's channel mean)
    σ²_c   = mean_n r_n² v[n,c] + mean_n (r_n m[n,c] − μ_c)²      (Chan et al.'s pooled variance)

and the output is a single pass y = x · a[n,c] + b[c]. Backward reads (x, dy) once for Σ_S dy and
Σ_S dy·x per (n, c) and writes dx = dy · P[n,c] + x · Q[n,c] + R[n,c] in one more pass. Only x and
O(N·C) statistics are saved, exactly what BatchNorm saves.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the input's own type otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _spatial_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """View an (N, C) or (C,) tensor so that it broadcasts against an ndim-dimensional input."""
    if t.dim() == 1:
        return t.view((1, -1) + (1,) * (ndim - 2))
    return t.view(t.shape + (1,) * (ndim - 2))


def spatial_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ over the spatial dims, giving (N, C), accumulated in ``dtype``."""
    if t.dim() == 2:
        return t.to(dtype)
    return t.sum(dim=_spatial_dims(t), dtype=dtype)


class SampleChannelMoments(NamedTuple):
    """Per-(n, c) mean and centred (biased) variance of x over its spatial positions."""

    mean: Tensor
    var: Tensor


def sample_channel_moments(x: Tensor) -> SampleChannelMoments:
    acc = accumulation_dtype(x.dtype)
    if x.dim() == 2:
        mean = x.to(acc)
        return SampleChannelMoments(mean, torch.zeros_like(mean))
    xs = x if x.dtype == acc else x.to(acc)
    var, mean = torch.var_mean(xs, dim=_spatial_dims(x), correction=0)
    return SampleChannelMoments(mean, var)


class BatchStatistics(NamedTuple):
    scale: Tensor  # r_n, shape (N,)
    norm: Tensor  # ‖x_n‖ unclamped, shape (N,)
    mean: Tensor  # μ_c of the normalised input, shape (C,)
    var: Tensor  # biased σ²_c of the normalised input, shape (C,)


def batch_statistics(moments: SampleChannelMoments, spatial_size: int, *, rescale: bool, l2_eps: float) -> BatchStatistics:
    """Sample scales and channel statistics of the l2-normalised input, from per-(n, c) moments."""
    m, v = moments
    num_channels = m.shape[1]
    sq_norm = spatial_size * (v + m * m).sum(dim=1)
    norm = sq_norm.sqrt()
    target = math.sqrt(num_channels * spatial_size) if rescale else 1.0
    scale = target / norm.clamp_min(l2_eps)
    scaled_mean = scale[:, None] * m
    mean = scaled_mean.mean(dim=0)
    var = (scale * scale)[:, None].mul(v).mean(dim=0) + (scaled_mean - mean).square().mean(dim=0)
    return BatchStatistics(scale, norm, mean, var)


def sample_scale(x: Tensor, *, rescale: bool, l2_eps: float) -> tuple[Tensor, Tensor]:
    """(r_n, ‖x_n‖) from one read of x, accumulated in at least float32."""
    acc = accumulation_dtype(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=acc)
    target = math.sqrt(x[0].numel()) if rescale else 1.0
    return target / norm.clamp_min(l2_eps), norm


class FusedL2BatchNorm(torch.autograd.Function):
    """y = γ·(r_n x − μ)·invstd + β with hand-written backward; statistics are inputs, not recomputed."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, norm, mean, invstd, moments_sum, moments_sq, batch_stats, l2_eps):
        acc = scale.dtype
        gamma = weight.to(acc) if weight is not None else torch.ones_like(invstd)
        beta = bias.to(acc) if bias is not None else torch.zeros_like(invstd)
        gain = gamma * invstd
        a = scale[:, None] * gain[None, :]
        b = beta - mean * gain
        y = torch.addcmul(_per_channel(b.to(x.dtype), x.dim()), x, _per_channel(a.to(x.dtype), x.dim()))
        ctx.save_for_backward(x, gamma, scale, norm, mean, invstd, moments_sum, moments_sq)
        ctx.batch_stats = batch_stats
        ctx.l2_eps = l2_eps
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, scale, norm, mean, invstd, x_sum, x_sq = ctx.saved_tensors
        acc = scale.dtype
        nd = x.dim()
        dy_sum = spatial_sum(dy, acc)
        dy_x = spatial_sum(dy * x, acc)
        # Σ_S dy·ẑ per (n, c), with ẑ = (r_n x − μ_c)·invstd_c
        dy_zhat = invstd * (scale[:, None] * dy_x - mean * dy_sum)
        grad_bias = dy_sum.sum(dim=0)
        grad_weight = dy_zhat.sum(dim=0)
        gain = gamma * invstd  # dz = gain·dy + coef_x·x + coef_1   (z = r_n x)
        if ctx.batch_stats:
            count = x.shape[0] * (x[0, 0].numel())
            coef_x = -(gain * invstd * grad_weight / count)[None, :] * scale[:, None]
            coef_1 = gain * (invstd * mean * grad_weight - grad_bias) / count
            t = (gain * dy_x + coef_x * x_sq + coef_1 * x_sum).sum(dim=1)
        else:
            coef_x = torch.zeros_like(dy_sum)
            coef_1 = torch.zeros_like(gain)
            t = (gain * dy_x).sum(dim=1)
        # t = T_n = Σ_{c,S} dz·x; the l2 step adds −r_n x T_n / ‖x_n‖² (zero where the norm is clamped)
        unclamped = norm > ctx.l2_eps
        u = torch.where(unclamped, t / norm.clamp_min(ctx.l2_eps).square(), torch.zeros_like(t))
        p = scale[:, None] * gain[None, :]
        q = scale[:, None] * (coef_x - u[:, None])
        r = scale[:, None] * coef_1[None, :]
        dx = torch.addcmul(_per_channel(r.to(x.dtype), nd), x, _per_channel(q.to(x.dtype), nd))
        dx.addcmul_(dy, _per_channel(p.to(x.dtype), nd))
        grad_weight = grad_weight if ctx.has_weight else None
        grad_bias = grad_bias if ctx.has_bias else None
        return dx, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def l2_batch_norm_fused(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    rescale: bool = True,
    l2_eps: float = 1e-12,
) -> Tensor:
    """Same contract as :func:`l2bn.kernels.reference.l2_batch_norm_reference`, fused."""
    spatial_size = input[0, 0].numel() if input.shape[0] else math.prod(input.shape[2:])
    with torch.no_grad():
        if training:
            moments = sample_channel_moments(input.detach())
            stats = batch_statistics(moments, spatial_size, rescale=rescale, l2_eps=l2_eps)
            scale, norm, mean, var = stats
            x_sum = spatial_size * moments.mean
            x_sq = spatial_size * (moments.var + moments.mean.square())
            if running_mean is not None and running_var is not None:
                count = input.shape[0] * spatial_size
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
        else:
            scale, norm = sample_scale(input.detach(), rescale=rescale, l2_eps=l2_eps)
            acc = scale.dtype
            mean, var = running_mean.to(acc), running_var.to(acc)
            x_sum = x_sq = None  # not needed: statistics are constants in eval
        invstd = (var + eps).rsqrt()
    return FusedL2BatchNorm.apply(
        input, weight, bias, scale, norm, mean, invstd, x_sum, x_sq, training, l2_eps
    )
