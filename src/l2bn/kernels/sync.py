"""The synchronized L2BN op: channel statistics (and their gradients) reduced across ``torch.distributed`` ranks.

L2BN (Wang et al., eq. 3) first scales every sample to norm sqrt(D), then batch-normalises. A sample lives
on one rank, so the per-sample norms stay local; only the per-channel statistics of the normalised input
x̂ need reducing. From the per-(n, c) moments of :mod:`l2bn.kernels.fused` every rank forms its local count,
Σx̂ and Σx̂² per channel in float64 (Σx̂² from centred pieces, Σ_n r_n²·(q + M·m²)); one ``all_reduce`` of
those 2C + 1 numbers gives the global mean and variance. The one subtraction, E[x̂²] − E[x̂]², happens in
float64 and loses log10(1 + μ²/σ²) of its ~16 digits (still ~10 digits for a channel with μ/σ = 1000).
An all-reduce keeps the traffic O(C) at any world size, where an all-gather would be O(C × ranks).
Backward needs the global Σdy and Σdy·ẑ per channel: one more ``all_reduce`` (float64). Works on every backend
(gloo on CPU, nccl on GPU), unlike ``torch.nn.SyncBatchNorm`` which is CUDA-only, and with different (even
empty) local batches.

This module holds the contract, the path switch and the torch-op path; the compiled CPU kernel
(:mod:`l2bn.kernels.cpp_sync`) and the Triton kernels (:mod:`l2bn.kernels.triton_sync`) run the same
reductions in their own passes, sending the same sums.

References: Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances" (1979), for the local pooling; torch's ``nn.SyncBatchNorm`` for the contract (local weight/bias
gradients, averaged by DDP like every other parameter).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .algebra import (
    check_synced_count,
    input_gradient,
    output_coefficients,
    sample_scales,
    synced_statistics,
    update_running_stats,
)
from .dispatch import auto_impl, requested_impl
from .fused import affine_rows, gradient_sums, per_channel, sample_channel_moments, statistics_dtype
from .overflow import check_sample_norms, rerun_rescaled_on_overflow

__all__ = ["sync_l2_batch_norm"]


def _reduce_channel_stats(
    count: Tensor, total: Tensor, squares: Tensor, process_group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """All-reduce every rank's per-channel count, Σx̂ and Σx̂² (float64) in ONE collective.

    Returns the global (count, mean, biased variance), the last two in float64. Ranks with count 0
    contribute nothing.
    """
    packed = torch.cat([count.reshape(1), total, squares]).to(torch.float64)
    dist.all_reduce(packed, group=process_group)
    return synced_statistics(packed)


def _all_reduce_float64(packed: Tensor, process_group: dist.ProcessGroup | None) -> Tensor:
    """``packed`` summed over the ranks in float64 (what every path sends), back in its dtype."""
    total = packed.to(torch.float64)
    dist.all_reduce(total, group=process_group)
    return total.to(packed.dtype)


class _SyncL2BatchNormFunction(torch.autograd.Function):
    """y = γ·(r_n x − μ)·invstd + β, where μ and invstd are global; backward all-reduces Σdy and Σdy·ẑ."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, norm, mean, invstd, centre, sumsq, total, l2_eps, process_group):
        a, shift, _ = output_coefficients(scale, mean, weight, bias, invstd=invstd)
        y = affine_rows(torch.empty_like(x), x, a, shift)
        ctx.save_for_backward(x, weight, scale, norm, mean, invstd, centre, sumsq, total)
        ctx.l2_eps = l2_eps
        ctx.process_group = process_group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, norm, mean, invstd, centre, sumsq, total = ctx.saved_tensors
        acc = scale.dtype
        dy_sum, dy_xc = gradient_sums(dy, x, centre.to(statistics_dtype(x)))  # (N, C): Σ_S dy, Σ_S dy·(x − m)

        grad = input_gradient(
            dy_sum, dy_xc, centre=centre, sumsq=sumsq, scale=scale, norm=norm, mu=mean, invstd=invstd,
            weight=weight, spatial_size=x[0, 0].numel() if x.shape[0] else 1, count=total, l2_eps=ctx.l2_eps,
            all_reduce=lambda packed: _all_reduce_float64(packed, ctx.process_group),
        )
        dx = affine_rows(torch.empty_like(x), dy, grad.dy_coef, grad.shift)
        dx.addcmul_(x, per_channel(grad.x_coef.to(x.dtype), x.dim()))
        # like nn.SyncBatchNorm: parameter gradients stay local; DDP averages them with all the others
        param_dtype = weight.dtype if weight is not None else acc
        weight_grad = grad.grad_weight.to(param_dtype) if ctx.needs_input_grad[1] else None
        bias_grad = grad.grad_bias.to(param_dtype) if ctx.needs_input_grad[2] else None
        return dx, weight_grad, bias_grad, *([None] * 9)


def sync_l2_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: dist.ProcessGroup | None = None,
    *,
    rescale: bool = True,
    l2_eps: float = 1e-12,
    impl: str | None = None,
) -> Tensor:
    """Training-mode L2BN whose batch statistics span all ranks of ``process_group`` (an initialised group).

    Every rank must call it (with the same C); local batch sizes may differ, including 0. Running
    statistics, if given, are updated in place with the global mean and unbiased variance. A huge finite
    sample (values beyond ~1e19) is handled locally, before any collective: rerun rescaled on the CPU,
    float64 statistics on accelerators (docs/algorithm.md).

    ``impl`` (default ``$L2BN_IMPL``, else ``"auto"``): ``"triton"`` runs the Triton kernels
    (:mod:`l2bn.kernels.triton_sync`), ``"cpp"`` the compiled CPU kernel (:mod:`l2bn.kernels.cpp_sync`) —
    ``auto`` picks them as for the local layers, outside ``torch.compile`` — and ``"fused"`` or
    ``"reference"`` the torch ops of this module. Every path sends the same float64 sums, so ranks on
    different paths interoperate.
    """
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {input.dim()}D input of shape {tuple(input.shape)}")
    num_channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != num_channels:
            raise RuntimeError(f"{name} should contain {num_channels} elements not {t.numel()}")
    path = _sync_path(impl, input)
    if path == "triton":
        from .triton_sync import sync_l2_batch_norm_triton as run  # imports triton on first use, as dispatch does
    elif path == "cpp":
        from .cpp_sync import sync_l2_batch_norm_cpp as run
    else:
        run = _sync_l2_batch_norm_torch_ops
    return run(input, running_mean, running_var, weight, bias, momentum, eps, process_group, rescale=rescale,
               l2_eps=l2_eps)


def _sync_path(impl: str | None, input: Tensor) -> str:
    """"triton", "cpp" or "torch": ``impl`` (or ``$L2BN_IMPL``) as named, ``"auto"`` as
    :func:`l2bn.kernels.dispatch.auto_impl` picks (``"fused"`` and ``"reference"``: the torch ops); the torch ops
    for the compiled kernel while torch.compile traces (its synchronized operators cannot be traced)."""
    name = requested_impl(impl)
    if name == "auto":
        name = auto_impl(input)
    if name == "cpp" and torch.compiler.is_compiling():  # its synchronized operators are not custom operators
        return "torch"
    return name if name in ("triton", "cpp") else "torch"


@rerun_rescaled_on_overflow
def _sync_l2_batch_norm_torch_ops(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    process_group: dist.ProcessGroup | None,
    *,
    rescale: bool,
    l2_eps: float,
) -> Tensor:
    """:func:`sync_l2_batch_norm` through torch ops (every device and backend)."""
    spatial_size = math.prod(input.shape[2:])
    with torch.no_grad():
        x = input.detach()
        m, v = sample_channel_moments(x)  # (N, C) mean and biased variance over S, in ≥ float32
        acc = m.dtype
        scale, norm = sample_scales(m, spatial_size * v, spatial_size, rescale=rescale, l2_eps=l2_eps)
        check_sample_norms(x, norm)  # local, before the collectives: huge samples rerun rescaled
        # local per-channel Σx̂ and Σx̂² of x̂ = r_n x, in float64, Σx̂² from centred pieces: r_n²·M·(v + m²)
        batch = x.shape[0]
        r, m64, v64 = scale.double()[:, None], m.double(), v.double()
        local_total = spatial_size * (r * m64).sum(dim=0)
        local_squares = spatial_size * (r * r * (v64 + m64.square())).sum(dim=0)
        local_count = torch.tensor(float(batch * spatial_size), dtype=torch.float64, device=m.device)
        total, mean, var = _reduce_channel_stats(local_count, local_total, local_squares, process_group)
        mean, var = mean.to(acc), var.to(acc)
        check_synced_count(total, input)
        update_running_stats(running_mean, running_var, mean, var, total, momentum)
        invstd = (var + eps).rsqrt()
    return _SyncL2BatchNormFunction.apply(
        input, weight, bias, scale, norm, mean, invstd, m, spatial_size * v, total, l2_eps, process_group
    )
