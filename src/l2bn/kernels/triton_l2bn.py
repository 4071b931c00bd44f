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

Values are read into float32 (float64 for float64 input). The per-(n, c) statistics and the O(N·C) algebra
between the kernels (ordinary torch ops) are float64. Huge finite inputs — values beyond ~1e19, whose squares
overflow float32 — are handled on the device, without a host check: every chunk of a row is multiplied by the
power of two that brings its max |x| into [1, 4) before it is squared (exact, so the usual input's chunk
moments are unchanged), and its moments are scaled back in float64; the gradient read does the same for
x − K, and the input gradient's x-term takes a per-sample power of two (docs/algorithm.md).

The module imports without Triton (``TRITON_AVAILABLE`` is then False and calling raises). With
``TRITON_INTERPRET=1`` set before Triton is first imported, the kernels run on CPU tensors through
Triton's interpreter (``INTERPRETED``); that is how the tests exercise them on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import Tensor

from .algebra import channel_statistics, input_gradient, output_coefficients, update_running_stats
from .fused import _rows, _rows_view, accumulation_dtype
from .overflow import huge_sample_factors

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None


def _interpret_requested() -> bool:
    """Whether ``triton.jit`` builds interpreted kernels: its ``knobs`` (triton >= 3.4), else the environment
    variable older releases read."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton fixes compiled vs interpreted when it decorates a kernel, i.e. when this module is imported.
INTERPRETED = TRITON_AVAILABLE and _interpret_requested()
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elements per program tile: reductions keep two accumulators per element, so they use smaller tiles.
_REDUCE_TILE = 2048
_ELEMENTWISE_TILE = 4096
_MAX_BLOCK_M = 1024  # longest chunk of positions per row for NCHW-like rows
_MAX_BLOCK_C_CHANNELS_LAST = 32  # channels per tile when C is the contiguous axis


if TRITON_AVAILABLE:

    @triton.jit
    def _pow2_scale(amax):
        """Per row, powers of two s and 1/s with amax·s in [1, 4) (float32 amax ≥ 0): s = 2^(127 − e) for amax's
        biased exponent e clamped to [1, 253], so s and 1/s are normal floats and products by them exact."""
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 1), 253)
        s = ((254 - e) << 23).to(tl.float32, bitcast=True)
        inv = (e << 23).to(tl.float32, bitcast=True)
        return s, inv

    @triton.jit
    def _to_compute(t, SCALED: tl.constexpr):
        """t in the dtype the kernels compute with: float32 (SCALED: float32 and 16-bit input) or float64."""
        if SCALED:
            t = t.to(tl.float32)
        else:
            t = t.to(tl.float64)
        return t

    @triton.jit
    def _load_values(ptrs, mask, SCALED: tl.constexpr):
        return _to_compute(tl.load(ptrs, mask=mask, other=0.0), SCALED)

    @triton.jit
    def _chan_merge(v, mask, m_ok, count, mean, sumsq, SCALED: tl.constexpr):
        """Merge one chunk (rows of ``v``, valid where ``mask``) into per-row float64 (count, mean, Σ(x − mean)²):
        the chunk is centred on its own mean, then combined pairwise (Chan, Golub & LeVeque 1979). SCALED: each
        row of the chunk is first multiplied by the power of two bringing its max |x| into [1, 4), so no finite
        value's square overflows float32, and the chunk's moments are scaled back in float64."""
        chunk_count = tl.sum(m_ok.to(tl.float64), axis=0)
        if SCALED:
            s, inv = _pow2_scale(tl.max(tl.abs(v), axis=1))
            v = v * s[:, None]
        chunk_mean = tl.sum(v, axis=1) / chunk_count.to(v.dtype)
        centred = tl.where(mask, v - chunk_mean[:, None], 0.0)
        chunk_sumsq = tl.sum(centred * centred, axis=1).to(tl.float64)
        chunk_mean = chunk_mean.to(tl.float64)
        if SCALED:
            inv64 = inv.to(tl.float64)
            chunk_mean = chunk_mean * inv64
            chunk_sumsq = chunk_sumsq * inv64 * inv64
        total = count + chunk_count
        delta = chunk_mean - mean
        weight = chunk_count / total
        return total, mean + delta * weight, sumsq + chunk_sumsq + delta * delta * count * weight

    @triton.jit
    def _moments_kernel(
        x_ptr, mean_ptr, sumsq_ptr, C, M, sxn, sxc, sxm,
        SCALED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) mean and Σ (x − mean)² (float64), chunks of BLOCK_M positions merged pairwise (Chan et al.)."""
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        count = tl.zeros([BLOCK_C], dtype=tl.float64)
        mean = tl.zeros([BLOCK_C], dtype=tl.float64)
        sumsq = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            mask = c_ok[:, None] & m_ok[None, :]
            v = _load_values(base + offs_m[None, :] * sxm, mask, SCALED)
            count, mean, sumsq = _chan_merge(v, mask, m_ok, count, mean, sumsq, SCALED)
        out = n.to(tl.int64) * C + offs_c
        tl.store(mean_ptr + out, mean, mask=c_ok)
        tl.store(sumsq_ptr + out, sumsq, mask=c_ok)

    @triton.jit
    def _gradient_sums_kernel(
        dy_ptr, x_ptr, centre_ptr, dy_sum_ptr, dy_xc_ptr, mean_ptr, sumsq_ptr, C, M,
        sdn, sdc, sdm, sxn, sxc, sxm,
        WITH_MOMENTS: tl.constexpr, SCALED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) Σ dy and Σ dy·(x − centre) (float64) in one read of (dy, x).

        The dot product is taken about K — the row's first value (WITH_MOMENTS) or the given centre rounded to
        the compute dtype — chunk by chunk, x and K first scaled like ``_chan_merge``'s values (SCALED, by the
        power of two of the larger of max |x| and |K|), and moved to the centre at the end:
        Σ dy·(x − c) = Σ dy·(x − K) − (c − K)·Σ dy. WITH_MOMENTS: no centre is given; the same read also yields
        the mean m (the centre) and Σ (x − m)² exactly as ``_moments_kernel`` computes them (same chunks, same
        merge).
        """
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        rows = n.to(tl.int64) * C + offs_c
        dy_base = dy_ptr + n.to(tl.int64) * sdn + offs_c[:, None] * sdc
        x_base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        if WITH_MOMENTS:
            anchor = _load_values(x_ptr + n.to(tl.int64) * sxn + offs_c * sxc, c_ok, SCALED)
        else:
            centre = tl.load(centre_ptr + rows, mask=c_ok, other=0.0)
            anchor = _to_compute(centre, SCALED)
        count = tl.zeros([BLOCK_C], dtype=tl.float64)
        mean = tl.zeros([BLOCK_C], dtype=tl.float64)
        sumsq = tl.zeros([BLOCK_C], dtype=tl.float64)
        dy_sum = tl.zeros([BLOCK_C], dtype=tl.float64)
        dy_dot = tl.zeros([BLOCK_C], dtype=tl.float64)
        # Float64 input (not SCALED) adds whole tiles and reduces them once after the loop: a per-chunk sum
        # added straight into a float64 accumulator that is read twice after the loop fails an assertion
        # (loopResult.hasOneUse) in the OptimizeThreadLocality pass of Triton 3.4-3.6.
        dy_tile = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        dot_tile = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            mask = c_ok[:, None] & m_ok[None, :]
            g = _load_values(dy_base + offs_m[None, :] * sdm, mask, SCALED)
            v = _load_values(x_base + offs_m[None, :] * sxm, mask, SCALED)
            if SCALED:  # scaled before subtracting: x − K of values near float32's largest would overflow
                s, inv = _pow2_scale(tl.maximum(tl.max(tl.abs(v), axis=1), tl.abs(anchor)))
                d = tl.where(mask, v * s[:, None] - (anchor * s)[:, None], 0.0)
                dy_dot += tl.sum(g * d, axis=1).to(tl.float64) * inv.to(tl.float64)
                dy_sum += tl.sum(g, axis=1).to(tl.float64)
            else:
                dot_tile += g * tl.where(mask, v - anchor[:, None], 0.0)
                dy_tile += g
            if WITH_MOMENTS:
                count, mean, sumsq = _chan_merge(v, mask, m_ok, count, mean, sumsq, SCALED)
        if not SCALED:
            dy_dot = tl.sum(dot_tile, axis=1)
            dy_sum = tl.sum(dy_tile, axis=1)
        if WITH_MOMENTS:
            centre = mean
            tl.store(mean_ptr + rows, mean, mask=c_ok)
            tl.store(sumsq_ptr + rows, sumsq, mask=c_ok)
        dy_dot = dy_dot - (centre - anchor.to(tl.float64)) * dy_sum
        tl.store(dy_sum_ptr + rows, dy_sum, mask=c_ok)
        tl.store(dy_xc_ptr + rows, dy_dot, mask=c_ok)

    @triton.jit
    def _affine_kernel(
        out_ptr, u_ptr, v_ptr, p_ptr, q_ptr, r_ptr, vf_ptr, C, M, num_m_blocks,
        son, soc, som, sun, suc, sum_, svn, svc, svm,
        HAS_V: tl.constexpr, HAS_VF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """out = u·P[n,c] + (v·F[n])·Q[n,c] + R[n,c] (the v term only if HAS_V, F = 1 unless HAS_VF), computed
        in P's dtype."""
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
            v = v.to(acc_ty)
            if HAS_VF:
                v = v * tl.load(vf_ptr + n)
            res += v * q[:, None]
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


def _scaled(x: Tensor) -> bool:
    """Whether the kernels compute with x in float32 with per-chunk power-of-two scaling (all but float64)."""
    return x.dtype != torch.float64


def sample_channel_moments_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """(m, q): per-(n, c) mean and Σ_S (x − m)² of an (N, C, *S) tensor, (N, C) float64 each, one read of x."""
    x, rows = _row_strides(x)
    n, num_channels, spatial = rows.shape
    mean = torch.empty(n, num_channels, dtype=torch.float64, device=x.device)
    sumsq = torch.empty_like(mean)
    block_c, block_m = _tile(rows, _REDUCE_TILE)
    with _on_device(x):
        _moments_kernel[(n, triton.cdiv(num_channels, block_c))](
            rows, mean, sumsq, num_channels, spatial, *rows.stride(),
            SCALED=_scaled(x), BLOCK_C=block_c, BLOCK_M=block_m,
        )
    return mean, sumsq


def _gradient_sums(dy: Tensor, x: Tensor, centre: Tensor | None) -> tuple[Tensor, ...]:
    dy, dy_rows = _row_strides(dy)
    x, x_rows = _row_strides(x)
    n, num_channels, spatial = x_rows.shape
    with_moments = centre is None
    stats = dict(dtype=torch.float64, device=x.device)
    centre = torch.empty(n, num_channels, **stats) if with_moments else centre.to(torch.float64).contiguous()
    dy_sum, dy_xc = torch.empty_like(centre), torch.empty_like(centre)
    mean, sumsq = (torch.empty_like(centre), torch.empty_like(centre)) if with_moments else (centre, centre)
    block_c, block_m = _tile(x_rows, _REDUCE_TILE)  # the forward's tiles: the same moments, bit for bit
    with _on_device(x):
        _gradient_sums_kernel[(n, triton.cdiv(num_channels, block_c))](
            dy_rows, x_rows, centre, dy_sum, dy_xc, mean, sumsq, num_channels, spatial,
            *dy_rows.stride(), *x_rows.stride(),
            WITH_MOMENTS=with_moments, SCALED=_scaled(x), BLOCK_C=block_c, BLOCK_M=block_m,
        )
    return (mean, sumsq, dy_sum, dy_xc) if with_moments else (dy_sum, dy_xc)


def gradient_sums_triton(dy: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_S dy, Σ_S dy·(x − centre)) per (n, c), float64, from one read of (dy, x)."""
    return _gradient_sums(dy, x, centre)


def moments_and_gradient_sums_triton(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m, q, Σ_S dy, Σ_S dy·(x − m)) per (n, c), float64, from one read of (dy, x); m and q equal
    :func:`sample_channel_moments_triton`'s, so backward need not save them."""
    return _gradient_sums(dy, x, None)


def affine_triton(
    out: Tensor, u: Tensor, p: Tensor, r: Tensor, v: Tensor | None = None, q: Tensor | None = None,
    v_factor: Tensor | None = None,
) -> Tensor:
    """out = u·p[n,c] + r[(n,) c] (+ (v·v_factor[n])·q[n,c]) elementwise over (N, C, *S), into ``out`` in one pass.

    p, q are (N, C), r broadcasts to (N, C) and ``v_factor`` is (N,), all in the compute dtype (p's);
    ``out`` must be dense (e.g. ``torch.empty_like(x)``).
    """
    if (v is None) != (q is None):
        raise ValueError("v and q must be given together")
    if v_factor is not None and v is None:
        raise ValueError("v_factor scales v: give v and q too")
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
    has_vf = v_factor is not None
    v_factor = v_factor.to(p.dtype).contiguous() if has_vf else p
    block_c, block_m = _tile(out_rows, _ELEMENTWISE_TILE)
    num_m_blocks = triton.cdiv(spatial, block_m)
    with _on_device(out):
        _affine_kernel[(n * num_m_blocks, triton.cdiv(num_channels, block_c))](
            out_rows, u_rows, v_rows, p, q, r, v_factor, num_channels, spatial, num_m_blocks,
            *out_rows.stride(), *u_rows.stride(), *v_rows.stride(),
            HAS_V=has_v, HAS_VF=has_vf, BLOCK_C=block_c, BLOCK_M=block_m,
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
        mean, sumsq = sample_channel_moments_triton(x)  # one read of x; the norms follow in eval too (float64)
        scale, norm, mu, var = channel_statistics(mean, sumsq, spatial, rescale=rescale, l2_eps=l2_eps)
        if not training:
            mu, var = running_mean.to(torch.float64, copy=True), running_var.to(torch.float64, copy=True)
        a, shift, invstd = output_coefficients(scale, mu, weight, bias, var=var, eps=eps)
        y = affine_triton(torch.empty_like(x), x, a.to(acc), shift.to(acc))
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
        acc = accumulation_dtype(x.dtype)
        # 1 but for huge samples, whose x·factor has norm in [0.5, 1): the x-term (x·factor)·(Q/factor) stays in
        # float32's range where Q (~1/‖x_n‖²) itself would underflow
        factor = huge_sample_factors(norm, 0)
        dx = affine_triton(torch.empty_like(x), dy, grad.dy_coef.to(acc), grad.shift.to(acc), v=x,
                           q=(grad.x_coef / factor[:, None]).to(acc), v_factor=factor.to(acc))
        param_dtype = weight.dtype if weight is not None else acc
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
