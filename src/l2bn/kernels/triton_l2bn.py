"""Fused L2BN on CUDA with Triton: one statistics read, one output pass, one gradient read, one dx pass.

The algebra is the one of :mod:`l2bn.kernels.fused` (derivation in ``docs/algorithm.md``). The input is
seen as rows (N, C, M), M = |S|, through its strides, so NCHW-contiguous and channels_last tensors (and
any layout whose spatial dims flatten to a view) are read in place. Three kernels:

- ``_moments_kernel``: per (n, c) the mean m and centred sum of squares q = Σ_S (x − m)², one program per
  (n, block of channels). Each chunk of positions is centred on its own mean and merged with the running
  totals by Chan, Golub and LeVeque's pairwise update (1979), so there is no E[x²] − E[x]² cancellation.
- ``_gradient_sums_kernel``: per (n, c) Σ_S dy and Σ_S dy·(x − m) from one read of (dy, x); in backward
  the same read recomputes m and q (bit-identical to the forward's), so only x and the weight are saved.
- ``_affine_kernel``: out = u·P[n,c] + v·Q[n,c] + R[n,c] (v optional), elementwise; the forward output
  (u = x, no v) and the input gradient (u = dy, v = x) in one pass each.

Statistics accumulate in the dtype of the statistics buffers: float32 for float16/bfloat16/float32 input,
float64 for float64 input. The O(N·C) algebra between the kernels is ordinary torch ops.

The module imports without Triton (``TRITON_AVAILABLE`` is then False and calling raises). With
``TRITON_INTERPRET=1`` set before Triton is first imported, the kernels run on CPU tensors through
Triton's interpreter (``INTERPRETED``); that is how the tests exercise them on machines without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from .algebra import channel_statistics, input_gradient, output_coefficients, update_running_stats
from .fused import _rows, _rows_view, accumulation_dtype
from .overflow import check_sample_norms, rerun_rescaled_on_overflow

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
# Triton fixes compiled vs interpreted when it decorates a kernel, i.e. when this module is imported.
INTERPRETED = TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elements per program tile: reductions keep two accumulators per element, so they use smaller tiles.
_REDUCE_TILE = 2048
_ELEMENTWISE_TILE = 4096
_MAX_BLOCK_M = 1024  # longest chunk of positions per row for NCHW-like rows
_MAX_BLOCK_C_CHANNELS_LAST = 32  # channels per tile when C is the contiguous axis


if TRITON_AVAILABLE:

    @triton.jit
    def _chan_merge(v, mask, m_ok, count, mean, sumsq):
        """Merge one chunk (rows of ``v``, valid where ``mask``) into per-row (count, mean, Σ(x − mean)²):
        the chunk is centred on its own mean, then combined pairwise (Chan, Golub & LeVeque 1979)."""
        chunk_count = tl.sum(m_ok.to(mean.dtype), axis=0)
        chunk_mean = tl.sum(v, axis=1) / chunk_count
        centred = tl.where(mask, v - chunk_mean[:, None], 0.0)
        chunk_sumsq = tl.sum(centred * centred, axis=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        weight = chunk_count / total
        return total, mean + delta * weight, sumsq + chunk_sumsq + delta * delta * count * weight

    @triton.jit
    def _moments_kernel(
        x_ptr, mean_ptr, sumsq_ptr, C, M, sxn, sxc, sxm,
        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) mean and Σ (x − mean)², chunks of BLOCK_M positions merged pairwise (Chan et al.)."""
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        acc_ty = mean_ptr.dtype.element_ty
        base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        count = tl.zeros([BLOCK_C], dtype=acc_ty)
        mean = tl.zeros([BLOCK_C], dtype=acc_ty)
        sumsq = tl.zeros([BLOCK_C], dtype=acc_ty)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            mask = c_ok[:, None] & m_ok[None, :]
            v = tl.load(base + offs_m[None, :] * sxm, mask=mask, other=0.0).to(acc_ty)
            count, mean, sumsq = _chan_merge(v, mask, m_ok, count, mean, sumsq)
        out = n.to(tl.int64) * C + offs_c
        tl.store(mean_ptr + out, mean, mask=c_ok)
        tl.store(sumsq_ptr + out, sumsq, mask=c_ok)

    @triton.jit
    def _gradient_sums_kernel(
        dy_ptr, x_ptr, centre_ptr, dy_sum_ptr, dy_xc_ptr, mean_ptr, sumsq_ptr, C, M,
        sdn, sdc, sdm, sxn, sxc, sxm,
        WITH_MOMENTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) Σ dy and Σ dy·(x − centre) in one read of (dy, x), accumulated tile-wise.

        WITH_MOMENTS: no centre is given; the same read also yields the mean m and Σ (x − m)² exactly as
        ``_moments_kernel`` computes them (same chunks, same merge), and the dot product is taken about the
        row's first value K and moved to the mean at the end: Σ dy·(x − m) = Σ dy·(x − K) − (m − K)·Σ dy.
        """
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        acc_ty = dy_sum_ptr.dtype.element_ty
        rows = n.to(tl.int64) * C + offs_c
        dy_base = dy_ptr + n.to(tl.int64) * sdn + offs_c[:, None] * sdc
        x_base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        if WITH_MOMENTS:
            centre = tl.load(x_ptr + n.to(tl.int64) * sxn + offs_c * sxc, mask=c_ok, other=0.0).to(acc_ty)
        else:
            centre = tl.load(centre_ptr + rows, mask=c_ok, other=0.0)
        count = tl.zeros([BLOCK_C], dtype=acc_ty)
        mean = tl.zeros([BLOCK_C], dtype=acc_ty)
        sumsq = tl.zeros([BLOCK_C], dtype=acc_ty)
        acc_sum = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
        acc_dot = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            mask = c_ok[:, None] & m_ok[None, :]
            g = tl.load(dy_base + offs_m[None, :] * sdm, mask=mask, other=0.0).to(acc_ty)
            v = tl.load(x_base + offs_m[None, :] * sxm, mask=mask, other=0.0).to(acc_ty)
            acc_sum += g
            acc_dot += g * (v - centre[:, None])
            if WITH_MOMENTS:
                count, mean, sumsq = _chan_merge(v, mask, m_ok, count, mean, sumsq)
        dy_sum = tl.sum(acc_sum, axis=1)
        dy_dot = tl.sum(acc_dot, axis=1)
        if WITH_MOMENTS:
            dy_dot = dy_dot - (mean - centre) * dy_sum
            tl.store(mean_ptr + rows, mean, mask=c_ok)
            tl.store(sumsq_ptr + rows, sumsq, mask=c_ok)
        tl.store(dy_sum_ptr + rows, dy_sum, mask=c_ok)
        tl.store(dy_xc_ptr + rows, dy_dot, mask=c_ok)

    @triton.jit
    def _affine_kernel(
        out_ptr, u_ptr, v_ptr, p_ptr, q_ptr, r_ptr, C, M, num_m_blocks,
        son, soc, som, sun, suc, sum_, svn, svc, svm,
        HAS_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """out = u·P[n,c] + v·Q[n,c] + R[n,c] (the v term only if HAS_V), computed in P's dtype."""
        pid = tl.program_id(0)
        n = pid // num_m_blocks
        offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = c_ok[:, None] & (offs_m < M)[None, :]
        acc_ty = p_ptr.dtype.element_ty
        rows = n.to(tl.int64) * C + offs_c
        p = tl.load(p_ptr + rows, mask=c_ok, other=0.0)
        r = tl.load(r_ptr + rows, mask=c_ok, other=0.0)
        n64 = n.to(tl.int64)
        u = tl.load(u_ptr + n64 * sun + offs_c[:, None] * suc + offs_m[None, :] * sum_, mask=mask, other=0.0)
        res = u.to(acc_ty) * p[:, None] + r[:, None]
        if HAS_V:
            q = tl.load(q_ptr + rows, mask=c_ok, other=0.0)
            v = tl.load(v_ptr + n64 * svn + offs_c[:, None] * svc + offs_m[None, :] * svm, mask=mask, other=0.0)
            res += v.to(acc_ty) * q[:, None]
        out = out_ptr + n64 * son + offs_c[:, None] * soc + offs_m[None, :] * som
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _tile(rows: Tensor, elements: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M) for rows of shape (N, C, M): long along the unit-stride axis, ``elements`` in all."""
    _, num_channels, spatial = rows.shape
    if spatial > 1 and rows.stride(1) == 1 and rows.stride(2) != 1:  # channels_last: C is contiguous
        block_c = min(_next_pow2(num_channels), _MAX_BLOCK_C_CHANNELS_LAST)
        block_m = min(_next_pow2(spatial), max(1, elements // block_c))
    else:
        block_m = min(_next_pow2(spatial), _MAX_BLOCK_M)
        block_c = min(_next_pow2(num_channels), max(1, elements // block_m))
    return block_c, block_m


def _row_strides(t: Tensor) -> tuple[Tensor, Tensor]:
    """(t or a dense copy of it, its (N, C, M) view), the view sharing t's storage so kernels can write it."""
    rows = _rows_view(t)
    if rows is None:
        t = t.contiguous()
        rows = _rows(t)
    return t, rows


@contextlib.contextmanager
def _on_device(t: Tensor) -> Iterator[None]:
    """Make t's GPU the current one for the launch (Triton launches on the current device)."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def sample_channel_moments_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """(m, q): per-(n, c) mean and Σ_S (x − m)² of an (N, C, *S) tensor, (N, C) each, one read of x."""
    x, rows = _row_strides(x)
    n, num_channels, spatial = rows.shape
    acc = accumulation_dtype(x.dtype)
    mean = torch.empty(n, num_channels, dtype=acc, device=x.device)
    sumsq = torch.empty_like(mean)
    block_c, block_m = _tile(rows, _REDUCE_TILE)
    with _on_device(x):
        _moments_kernel[(n, triton.cdiv(num_channels, block_c))](
            rows, mean, sumsq, num_channels, spatial, *rows.stride(), BLOCK_C=block_c, BLOCK_M=block_m
        )
    return mean, sumsq


def _gradient_sums(dy: Tensor, x: Tensor, centre: Tensor | None) -> tuple[Tensor, ...]:
    dy, dy_rows = _row_strides(dy)
    x, x_rows = _row_strides(x)
    n, num_channels, spatial = x_rows.shape
    with_moments = centre is None
    acc = accumulation_dtype(x.dtype)
    centre = torch.empty(n, num_channels, dtype=acc, device=x.device) if with_moments else centre.contiguous()
    dy_sum, dy_xc = torch.empty_like(centre), torch.empty_like(centre)
    mean, sumsq = (torch.empty_like(centre), torch.empty_like(centre)) if with_moments else (centre, centre)
    block_c, block_m = _tile(x_rows, _REDUCE_TILE)  # the forward's tiles: the same moments, bit for bit
    with _on_device(x):
        _gradient_sums_kernel[(n, triton.cdiv(num_channels, block_c))](
            dy_rows, x_rows, centre, dy_sum, dy_xc, mean, sumsq, num_channels, spatial,
            *dy_rows.stride(), *x_rows.stride(), WITH_MOMENTS=with_moments, BLOCK_C=block_c, BLOCK_M=block_m,
        )
    return (mean, sumsq, dy_sum, dy_xc) if with_moments else (dy_sum, dy_xc)


def gradient_sums_triton(dy: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_S dy, Σ_S dy·(x − centre)) per (n, c), in ``centre``'s dtype, from one read of (dy, x)."""
    return _gradient_sums(dy, x, centre)


def moments_and_gradient_sums_triton(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m, q, Σ_S dy, Σ_S dy·(x − m)) per (n, c) from one read of (dy, x); m and q equal
    :func:`sample_channel_moments_triton`'s, so backward need not save them."""
    return _gradient_sums(dy, x, None)


def affine_triton(
    out: Tensor, u: Tensor, p: Tensor, r: Tensor, v: Tensor | None = None, q: Tensor | None = None
) -> Tensor:
    """out = u·p[n,c] + r[(n,) c] (+ v·q[n,c]) elementwise over (N, C, *S), written into ``out`` in one pass.

    p, q are (N, C) and r broadcasts to (N, C), all in the accumulation dtype; ``out`` must be dense
    (e.g. ``torch.empty_like(x)``).
    """
    if (v is None) != (q is None):
        raise ValueError("v and q must be given together")
    out_rows = _rows_view(out)
    if out_rows is None:
        raise ValueError(
            f"out must flatten to an (N, C, M) view; got strides {out.stride()} for shape {tuple(out.shape)}"
        )
    u, u_rows = _row_strides(u)
    n, num_channels, spatial = out_rows.shape
    p, r = p.contiguous(), r.expand(n, num_channels).contiguous()
    has_v = v is not None
    if has_v:
        v, v_rows = _row_strides(v)
        q = q.contiguous()
    else:
        v_rows, q = u_rows, p
    block_c, block_m = _tile(out_rows, _ELEMENTWISE_TILE)
    num_m_blocks = triton.cdiv(spatial, block_m)
    with _on_device(out):
        _affine_kernel[(n * num_m_blocks, triton.cdiv(num_channels, block_c))](
            out_rows, u_rows, v_rows, p, q, r, num_channels, spatial, num_m_blocks,
            *out_rows.stride(), *u_rows.stride(), *v_rows.stride(),
            HAS_V=has_v, BLOCK_C=block_c, BLOCK_M=block_m,
        )
    return out


class TritonL2BatchNorm(torch.autograd.Function):
    """L2BN through the Triton kernels; returns (y, μ, σ²) like :class:`l2bn.kernels.fused.FusedL2BatchNorm`
    (μ, σ² for the running-statistics update, not differentiable; the running ones in evaluation mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps):
        acc = accumulation_dtype(x.dtype)
        spatial = x[0, 0].numel()
        x, _ = _row_strides(x)  # a dense copy only if the spatial dims do not flatten to a view
        mean, sumsq = sample_channel_moments_triton(x)  # one read of x; the norms follow in eval too
        scale, norm, mu, var = channel_statistics(mean, sumsq, spatial, rescale=rescale, l2_eps=l2_eps)
        check_sample_norms(x, norm)  # before anything is written: huge samples rerun rescaled
        if not training:
            mu, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        a, shift, invstd = output_coefficients(scale, mu, weight, bias, var=var, eps=eps)
        y = affine_triton(torch.empty_like(x), x, a, shift)
        # x and the weight (and the fixed statistics in eval) only: backward's read of (dy, x) recomputes
        # the per-(n, c) moments, so no more is kept than BatchNorm keeps.
        ctx.save_for_backward(x, weight, *(() if training else (mu, invstd)))
        ctx.training, ctx.eps, ctx.rescale, ctx.l2_eps = training, eps, rescale, l2_eps
        ctx.mark_non_differentiable(mu, var)
        return y, mu, var

    @staticmethod
    def backward(ctx, dy, _dmu, _dvar):
        x, weight, *fixed = ctx.saved_tensors
        spatial = x[0, 0].numel()
        mean, sumsq, dy_sum, dy_xc = moments_and_gradient_sums_triton(dy, x)  # Σ dy, Σ dy·(x − m)
        scale, norm, mu, var = channel_statistics(mean, sumsq, spatial, rescale=ctx.rescale, l2_eps=ctx.l2_eps)
        mu, invstd = fixed if fixed else (mu, (var + ctx.eps).rsqrt())
        grad = input_gradient(
            dy_sum, dy_xc, centre=mean, sumsq=sumsq if ctx.training else None, scale=scale, norm=norm, mu=mu,
            invstd=invstd, weight=weight, spatial_size=spatial, count=x.shape[0] * spatial, l2_eps=ctx.l2_eps,
        )
        dx = affine_triton(torch.empty_like(x), dy, grad.dy_coef, grad.shift, v=x, q=grad.x_coef)
        param_dtype = weight.dtype if weight is not None else scale.dtype
        return (
            dx,
            grad.grad_weight.to(param_dtype) if ctx.needs_input_grad[1] else None,
            grad.grad_bias.to(param_dtype) if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None,
        )


def _check_triton_input(input: Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton L2BN path needs the 'triton' package; install it or use impl='fused'")
    if input.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the Triton L2BN path runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before import), "
            f"got a tensor on {input.device}; use impl='fused'"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton L2BN path supports dtypes {SUPPORTED_DTYPES}, got {input.dtype}")


@rerun_rescaled_on_overflow
def l2_batch_norm_triton(
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
    """Same contract as :func:`l2bn.kernels.fused.l2_batch_norm_fused`, through Triton kernels (CUDA)."""
    _check_triton_input(input)
    y, mu, var = TritonL2BatchNorm.apply(input, weight, bias, running_mean, running_var, training, eps, rescale, l2_eps)
    if training:
        update_running_stats(running_mean, running_var, mu, var, input.shape[0] * input[0, 0].numel(), momentum)
    return y


__all__ = [
    "TRITON_AVAILABLE",
    "TritonL2BatchNorm",
    "affine_triton",
    "gradient_sums_triton",
    "INTERPRETED",
    "moments_and_gradient_sums_triton",
    "l2_batch_norm_triton",
    "sample_channel_moments_triton",
]
