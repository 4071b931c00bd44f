"""Synchronized L2BN through the compiled CPU kernel: its passes with one all-reduce between them each way.

The contract and the numerics are :mod:`l2bn.kernels.sync`'s, and what crosses ranks is the same (forward 1 + 2C
float64: the count N·M and per-channel Σz, Σz² of z = r_n x; backward 2C float64: Σdy, Σdy·ẑ). The kernel's
general passes (``csrc/l2bn_cpu.cpp``, section "Synchronized L2BN") run as four operators: ``sync_local_sums``
(one read of x), [all-reduce], ``sync_output`` (the output pass, the running statistics with the global count);
``sync_gradient_sums`` (one read of (x, dy); what the dx pass needs kept in a workspace), [all-reduce],
``sync_input_gradient`` (the dx pass). A rank with no samples joins the collectives with zeros.

Deliberate difference from the torch-op path: μ and σ² stay float64 up to the coefficients (the torch ops round
them to the accumulation dtype first), as on the kernel's local path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import cpp
from .algebra import check_synced_count, synced_statistics, update_running_stats
from .fused import accumulation_dtype
from .overflow import rerun_rescaled_on_overflow

__all__ = ["sync_l2_batch_norm_cpp"]


class CppSyncL2BatchNorm(torch.autograd.Function):
    """Training-mode L2BN over all ranks of a process group, through the compiled CPU kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, process_group, rescale, l2_eps):
        ops, num_channels = cpp.operators(), x.shape[1]
        f64 = dict(dtype=torch.float64)
        if x.shape[0]:
            sums, scale = ops.sync_local_sums(x, l2_eps, rescale)
        else:  # nothing local: zeros into the collective
            sums, scale = torch.zeros(1 + 2 * num_channels, **f64), None
        dist.all_reduce(sums, group=process_group)
        check_synced_count(sums[:1], x)
        if x.shape[0]:
            y, mean, invstd = ops.sync_output(x, weight, bias, running_mean, running_var, sums, scale, momentum, eps)
        else:  # no output to write; the running statistics as on every rank
            count, mean, var = synced_statistics(sums)
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
            y, invstd = torch.empty_like(x), (var + eps).rsqrt()
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.process_group, ctx.rescale, ctx.l2_eps = float(sums[0]), process_group, rescale, l2_eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        ops, (n, num_channels) = cpp.operators(), x.shape[:2]
        if n:
            local, workspace = ops.sync_gradient_sums(dy, x, mean, invstd, ctx.l2_eps, ctx.rescale)
        else:
            local = torch.zeros(2 * num_channels, dtype=torch.float64)
        total = local.clone()
        dist.all_reduce(total, group=ctx.process_group)
        if n:
            dx = ops.sync_input_gradient(dy, x, weight, workspace, mean, invstd, total, ctx.count, ctx.l2_eps,
                                         ctx.rescale)
        else:
            dx = torch.empty_like(x)
        # like nn.SyncBatchNorm: parameter gradients stay local; DDP averages them with all the others
        param_dtype = weight.dtype if weight is not None else accumulation_dtype(x.dtype)
        grad_bias, grad_weight = local.to(param_dtype).chunk(2)
        return (
            dx,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            *([None] * 7),
        )


@rerun_rescaled_on_overflow
def sync_l2_batch_norm_cpp(
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
    """:func:`l2bn.kernels.sync.sync_l2_batch_norm` through the compiled CPU kernel (CPU tensors)."""
    cpp.check_on_cpu(input)
    return CppSyncL2BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps, process_group,
                                    rescale, l2_eps)
