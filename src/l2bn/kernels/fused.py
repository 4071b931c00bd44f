"""Fused L2BN over torch ops: statistics from two reads of x, one output pass, x plus O(N·C) saved for backward.

Notation: x has shape (N, C, *S), M = |S|, D = C·M. Per (n, c) we take the mean m and the centred sum of
squares q = Σ_S (x − m)² (a sum, then a centred norm: no E[x²] − E[x]² cancellation). From those:

    ‖x_n‖² = Σ_c (q[n,c] + M·m[n,c]²)              r_n = sqrt(D) / max(‖x_n‖, ε_l2)
    μ_c    = mean_n r_n m[n,c]                       (channel mean of z = r_n x)
    σ²_c   = Σ_n r_n² q[n,c] / (N·M) + mean_n (r_n m[n,c] − μ_c)²      (Chan et al.'s pooled variance)

and the output is one pass y = x·a[n,c] + b[c]. Backward reads (x, dy) once for Σ_S dy and Σ_S dy·(x − m)
per (n, c) and writes dx = dy·P[n,c] + x·Q[n,c] + R[n,c].

Speed on the CPU comes from reusing torch's BatchNorm kernels on the (1, N·C, M) view of an NCHW-contiguous
tensor, where every (n, c) pair is one "channel": the inference kernel is a vectorised per-row affine map
(torch's broadcasting ``addcmul`` is several times slower on that layout) and the backward kernel with
``output_mask=[False, True, True]`` returns exactly Σ dy and Σ dy·(x − m) per row in one read.
Channels-last tensors use broadcasting ops, which vectorise along the contiguous channel dimension.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .algebra import channel_statistics, input_gradient, nan_as_inf, output_coefficients, update_running_stats
from .overflow import check_sample_norms, rerun_rescaled_on_overflow


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the input's own type otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def statistics_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the per-(n, c) sums of squares and the O(N·C) algebra after them.

    The input's accumulation dtype on the CPU outside torch.compile, where a cheap host check catches the
    rare overflowing sample and reruns it rescaled (:mod:`l2bn.kernels.overflow`); float64 where no such
    check can run without stalling — under torch.compile (data-dependent) and on accelerators (a host sync
    per layer call) — so that no finite float32 or 16-bit sample overflows there (the cast fuses into the
    reductions under torch.compile; docs/algorithm.md).
    """
    acc = accumulation_dtype(x.dtype)
    if acc == torch.float32 and (torch.compiler.is_compiling() or x.device.type != "cpu"):
        return torch.float64
    return acc


def is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (torch.func's or autograd's ``is_grads_batched``), which the
    out= and view-based fast ops below cannot take."""
    if torch.compiler.is_compiling():  # dynamo traces backward on plain (fake) tensors
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def _rows(x: Tensor) -> Tensor:
    """(N, C, M) view of an (N, C, *S) tensor (M = 1 for 2D input); a view for NCHW and channels_last."""
    return x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)


def spatial_stride(t: Tensor) -> int | None:
    """The stride of t's positions when its spatial dims flatten to one (1 where there is one position), else
    None: the M-axis stride of the (N, C, M) view ``_rows(t)``, found without making it (a plain loop: the
    Triton wrapper asks this of the tensors of every call)."""
    shape, strides = t.shape, t.stride()
    innermost, expected = 1, None
    for i in range(len(shape) - 1, 1, -1):  # spatial dims, innermost first; size-1 dims have any stride
        if shape[i] == 1:
            continue
        if expected is None:
            innermost = strides[i]
        elif strides[i] != expected:
            return None
        expected = strides[i] * shape[i]
    return innermost


def _rows_view(t: Tensor | None) -> Tensor | None:
    """``_rows(t)`` when that is a view of t (so writes land in t), else None."""
    if t is None or spatial_stride(t) is None:
        return None
    return _rows(t)


def _flat_channels(x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """(1, N·C, M) view making each (n, c) a BatchNorm channel, when x is contiguous and of ``dtype``."""
    if x.dtype != dtype or not x.is_contiguous() or x.numel() == 0:
        return None
    return x.view(1, x.shape[0] * x.shape[1], -1)


def per_channel(t: Tensor, ndim: int) -> Tensor:
    """View an (N, C) or (C,) tensor so that it broadcasts against an ndim-dimensional input."""
    if t.dim() == 1:
        return t.view((1, -1) + (1,) * (ndim - 2))
    return t.view(t.shape + (1,) * (ndim - 2))


def affine_rows(out: Tensor, src: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """out = src·scale[n, c] + shift[(n,) c] over (N, C, *S) tensors; ``out`` may be ``src`` (in place).

    Picks, by layout, the torch ops measured fastest on the CPU (docs/performance.md): contiguous rows
    (NCHW) take a multiply then an add, which vectorise along the rows; channels_last takes one addcmul,
    which vectorises along the channels. Returns ``out``.
    """
    out_rows = _rows_view(out)
    # spatial dims that do not flatten in place (rare permutations), and torch.compile (which refuses out= views
    # that are not contiguous, and fuses the ops anyway): go through one out-of-place op
    if out_rows is None or torch.compiler.is_compiling():
        return out.copy_(torch.addcmul(per_channel(shift, src.dim()), src, per_channel(scale, src.dim())))
    src_rows = _rows(src)
    scale = scale.unsqueeze(-1)
    shift = shift.unsqueeze(-1) if shift.dim() == 2 else shift.view(1, -1, 1)
    if out_rows.stride(-1) == 1 and out_rows.shape[-1] > 1:
        torch.mul(src_rows, scale, out=out_rows).add_(shift)
    else:
        torch.addcmul(shift, src_rows, scale, out=out_rows)
    return out


class SampleChannelMoments(NamedTuple):
    """Per-(n, c) mean and centred (biased) variance of x over its spatial positions."""

    mean: Tensor
    var: Tensor


def _mean_and_centred_sumsq(x: Tensor, workspace: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(m, q): per-(n, c) mean (accumulation dtype) and Σ_S (x − m)² (:func:`statistics_dtype`), from two
    reads of x.

    ``workspace`` (x's shape, layout and the accumulation dtype) receives x − m; by default a temporary.
    """
    acc, stats = accumulation_dtype(x.dtype), statistics_dtype(x)
    rows = _rows(x)
    mean = rows.mean(dim=-1, dtype=stats).to(acc)  # |m| ≤ max |x|: fits acc once summed in stats
    centred = torch.sub(rows, mean.unsqueeze(-1), out=_rows_view(workspace))
    if rows.shape[-1] == 1:
        return mean, torch.zeros_like(mean, dtype=stats)
    # contiguous rows: the norm kernel is the fastest single read; float64 statistics: its squares, taken in
    # float64, cannot overflow for any finite float32 value
    if centred.stride(-1) == 1 or stats != acc:
        return mean, torch.linalg.vector_norm(centred, dim=-1, dtype=stats).square_()
    # strided rows (channels_last): norm kernels do not vectorise; square a private temporary in place
    squares = centred.square() if workspace is not None else centred.square_()
    return mean, squares.sum(dim=-1)


def sample_channel_moments(x: Tensor) -> SampleChannelMoments:
    """Per-(n, c) mean and biased variance over the spatial dims, accumulated in at least float32."""
    mean, sumsq = _mean_and_centred_sumsq(x)
    return SampleChannelMoments(mean, sumsq / _rows(x).shape[-1])


def sample_scale(x: Tensor, *, rescale: bool, l2_eps: float) -> tuple[Tensor, Tensor]:
    """(r_n, ‖x_n‖) from one read of x, accumulated in :func:`statistics_dtype`."""
    norm = nan_as_inf(torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=statistics_dtype(x)))
    target = math.prod(x.shape[1:]) ** 0.5 if rescale else 1.0  # stays symbolic under dynamic shapes
    return target / norm.clamp_min(l2_eps), norm


def gradient_sums(dy: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_S dy, Σ_S dy·(x − centre)) per (n, c), from one read of (dy, x) on the NCHW fast path
    (BatchNorm's backward reduction on the row view); elsewhere through a temporary dy·x."""
    acc = centre.dtype
    if is_batched(dy):  # batched gradients (vmap over backward)
        dims = tuple(range(2, x.dim()))
        product = dy.to(acc) * (x.to(acc) - per_channel(centre, x.dim()))
        return (dy.to(acc).sum(dims), product.sum(dims)) if dims else (dy.to(acc), product)
    flat_dy, flat_x = _flat_channels(dy, acc), _flat_channels(x, acc)
    if flat_dy is not None and flat_x is not None:
        ones = centre.new_ones(centre.numel())
        _, dot, total = torch.ops.aten.native_batch_norm_backward(
            flat_dy, flat_x, None, None, None, centre.reshape(-1), ones, True, 0.0, [False, True, True]
        )
        return total.view_as(centre), dot.view_as(centre)
    dy_rows, x_rows = _rows(dy), _rows(x)
    total = dy_rows.sum(dim=-1, dtype=acc)
    product = torch.mul(dy_rows.to(acc), x_rows)
    return total, product.sum(dim=-1, dtype=acc).sub_(centre * total)


def _rowwise_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor | None:
    """x·scale[n,c] + shift[c] through BatchNorm's single-pass inference kernel on the (1, N·C, M) row view.

    Fastest on NCHW rows, but the result is a view, which an autograd.Function must not return (in-place
    activations after the layer would fail): only for forwards that build no graph. None if x does not fit.
    """
    flat = _flat_channels(x, scale.dtype)
    if flat is None:
        return None
    rows = scale.numel()
    stats = (scale.new_zeros(rows), scale.new_ones(rows), 0.0, 0.0)
    out = torch.ops.aten._native_batch_norm_legit_no_training(flat, scale.reshape(rows), shift.expand(scale.shape).reshape(rows), *stats)
    return out[0].view(x.shape)


def _forward(x, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps, *, may_return_view=False):
    """Statistics and output of L2BN: (y, μ, σ², tensors backward needs)."""
    acc = accumulation_dtype(x.dtype)
    spatial = math.prod(x.shape[2:])
    if training:
        y = torch.empty_like(x)
        # y holds x − m until overwritten (not under torch.compile, which refuses strided out= views)
        centred_in_y = x.dtype == acc and _rows_view(y) is not None and not torch.compiler.is_compiling()
        mean, sumsq = _mean_and_centred_sumsq(x, workspace=y if centred_in_y else None)
        scale, norm, mu, var = channel_statistics(mean, sumsq, spatial, rescale=rescale, l2_eps=l2_eps)
    else:
        scale, norm = sample_scale(x, rescale=rescale, l2_eps=l2_eps)
        mu, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        mean = sumsq = None
    check_sample_norms(x, norm)  # before anything is written: huge samples rerun rescaled
    a, shift, invstd = output_coefficients(scale, mu, weight, bias, var=var, eps=eps)
    if training and centred_in_y:  # y = (x − m)·a + (m·a + b)
        affine_rows(y, y, a, shift + mean * a)
    elif training:
        affine_rows(y, x, a, shift)
    else:
        y = _rowwise_affine(x, a, shift) if may_return_view else None
        if y is None:
            y = affine_rows(torch.empty_like(x), x, a, shift)
    return y, mu, var, (scale, norm, mu, invstd, mean, sumsq)


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call records a graph: grad mode is on and one of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FusedL2BatchNorm(torch.autograd.Function):
    """L2BN with statistics, output and a hand-written backward; returns (y, μ, σ²) (the last two for the
    running-statistics update, not differentiable). In evaluation mode μ and σ² are the running ones."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps):
        with torch.no_grad():  # out= ops inside; tracers (torch.export) may run forward with grad enabled
            y, mu, var, saved = _forward(x, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps)
        ctx.save_for_backward(x, weight, *saved)
        ctx.l2_eps = l2_eps
        ctx.mark_non_differentiable(mu, var)
        return y, mu, var

    @staticmethod
    def backward(ctx, dy, _dmu, _dvar):
        x, weight, scale, norm, mu, invstd, mean, sumsq = ctx.saved_tensors
        if needs_autograd(dy, x, weight):
            raise RuntimeError("l2bn: the fused path has no double backward; use impl='reference'")
        acc = statistics_dtype(x)  # Σ dy·(x − m) of a huge sample overflows float32 too
        spatial = x[0, 0].numel()
        centre = mean.to(acc) if mean is not None else x.new_zeros(x.shape[:2], dtype=acc)  # eval: Σ dy·x itself
        dy_sum, dy_xc = gradient_sums(dy, x, centre)  # Σ dy, Σ dy·(x − centre)
        grad = input_gradient(
            dy_sum, dy_xc, centre=centre, sumsq=sumsq, scale=scale, norm=norm, mu=mu, invstd=invstd,
            weight=weight, spatial_size=spatial, count=x.shape[0] * spatial, l2_eps=ctx.l2_eps,
        )
        if is_batched(dy):  # batched gradients: out-of-place ops only
            coef = [per_channel(t, x.dim()) for t in (grad.dy_coef, grad.shift, grad.x_coef)]
            dx = (dy * coef[0] + coef[1] + x * coef[2]).to(x.dtype)
        else:
            dx = affine_rows(torch.empty_like(x), dy, grad.dy_coef, grad.shift)
            dx.addcmul_(x, per_channel(grad.x_coef, x.dim()))
        param_dtype = weight.dtype if weight is not None else acc
        return (
            dx,
            grad.grad_weight.to(param_dtype) if ctx.needs_input_grad[1] else None,
            grad.grad_bias.to(param_dtype) if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None,
        )


@rerun_rescaled_on_overflow
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
    """Same contract as :func:`l2bn.kernels.reference.l2_batch_norm_reference`, fused (CPU or any device);
    non-empty input (the dispatcher sends empty input to the reference)."""
    if needs_autograd(input, weight, bias):
        y, mu, var = FusedL2BatchNorm.apply(input, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps)
    else:  # inference: no autograd.Function, so the fastest output kernel may hand out a view
        y, mu, var, _ = _forward(
            input, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps, may_return_view=True
        )
    if training:
        update_running_stats(running_mean, running_var, mu, var, input.shape[0] * input[0, 0].numel(), momentum)
    return y
