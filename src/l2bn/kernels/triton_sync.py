"""Synchronized L2BN through the Triton kernels: the local launches of :mod:`l2bn.kernels.triton_l2bn` with one
all-reduce between them each way.

The contract and the numerics are :mod:`l2bn.kernels.sync`'s: per-sample norms stay local; every rank packs its
count N·M and per-channel Σz and Σz² (z = r_n x, float64) into one vector for ``all_reduce``; the global mean and
variance are E[z] and E[z²] − E[z]² in float64. Backward all-reduces Σdy and Σdy·ẑ; the parameter gradients stay
local, like ``nn.SyncBatchNorm``'s (DDP averages them). What the torch-op path runs as ~100 small ops a training
call runs here as launches: forward moments, sample scales, local sums (+1 for batches split across programs),
[all-reduce], coefficients, output; backward gradient sums, local sums (+1 split), [all-reduce], gradient
coefficients, sample coefficients, dx (+1 each way where rows are reduced in parts). Huge samples are handled
inside the kernels, as on the local path.

Deliberate difference from the torch-op path: the statistics stay in float64 up to the coefficients (the torch
ops round μ and σ² to the accumulation dtype first), as :mod:`l2bn.kernels.triton_l2bn` does locally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .algebra import check_synced_count
from .triton_l2bn import (
    _ACCUMULATION,
    _affine,
    _as_rows,
    _backward_channel_sums,
    _check_triton_input,
    _empty_rows_like,
    _forward_coefficients,
    _gradient_sums,
    _input_gradient,
    _local_channel_sums,
    _moments,
    _on_device,
    _sample_scales,
    _synced_gradient_coefficients,
)

__all__ = ["sync_l2_batch_norm_triton"]


class TritonSyncL2BatchNorm(torch.autograd.Function):
    """Training-mode L2BN over all ranks of a process group, through the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group, rescale, l2_eps):
        rows = _as_rows(x)
        x, spatial = rows.t, rows.m
        with _on_device(x):
            mean, sumsq = _moments(rows)  # an empty rank launches empty grids and contributes zeros
            scale, norm = _sample_scales(mean, sumsq, spatial, rescale, l2_eps)
            sums = _local_channel_sums(mean, sumsq, scale, spatial)
            dist.all_reduce(sums, group=process_group)
            count = sums[:1]
            check_synced_count(count, x)
            gain, shift, mu, invstd = _forward_coefficients(
                mean, sumsq, scale, weight, bias, running_mean, running_var, True, momentum, eps, spatial,
                _ACCUMULATION[x.dtype], sums=sums,
            )
            y = _affine(_empty_rows_like(rows), rows, gain, shift, None, None, None, p_factor=scale)
        ctx.save_for_backward(x, weight, scale, norm, mu, invstd, count)
        ctx.l2_eps, ctx.process_group = l2_eps, process_group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, norm, mu, invstd, count = ctx.saved_tensors
        x_rows, dy_rows = _as_rows(x), _as_rows(dy)
        spatial = x_rows.m
        with _on_device(x):
            mean, sumsq, dy_sum, dy_xc = _gradient_sums(dy_rows, x_rows, None)
            sums = torch.empty(2, x.shape[1], dtype=torch.float64, device=x.device)
            # like nn.SyncBatchNorm: parameter gradients stay local; DDP averages them with all the others
            grad_weight, grad_bias, gain, _, _ = _backward_channel_sums(
                dy_sum, dy_xc, mean, scale, mu, invstd, weight, False, spatial,
                weight.dtype if weight is not None else _ACCUMULATION[x.dtype], sums=sums,
            )
            dist.all_reduce(sums, group=ctx.process_group)
            k, bias_term = _synced_gradient_coefficients(sums, count, gain, invstd)
            dx = _input_gradient(dy_rows, x_rows, dy_sum, dy_xc, mean, sumsq, scale, norm, mu, gain, k, bias_term,
                                 True, ctx.l2_eps)
        return (
            dx,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            *([None] * 7),
        )


def sync_l2_batch_norm_triton(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    process_group: dist.ProcessGroup | None,
    *,
    rescale: bool = True,
    l2_eps: float = 1e-12,
) -> Tensor:
    """:func:`l2bn.kernels.sync.sync_l2_batch_norm` through the Triton kernels (CUDA, or the interpreter)."""
    _check_triton_input(input)
    return TritonSyncL2BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                       process_group, rescale, l2_eps)
