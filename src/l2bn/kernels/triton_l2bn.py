"""Fused L2BN on CUDA with Triton: one statistics read, one output pass, one gradient read, one dx pass.

The algebra is the one of :mod:`l2bn.kernels.algebra` (derivation in ``docs/algorithm.md``). The input is
seen as rows (N, C, M), M = |S|, through its strides, so NCHW-contiguous and channels_last tensors (and
any layout whose spatial dims flatten to a view) are read in place. Three kernels touch the big tensors:

- ``_moments_kernel``: per (n, c) the mean m and centred sum of squares q = Σ_S (x − m)², one program per
  (n, block of channels). Each chunk of positions is centred on its own mean and merged with the running
  totals by Chan, Golub and LeVeque's pairwise update (1979), so there is no E[x²] − E[x]² cancellation.
- ``_gradient_sums_kernel``: per (n, c) Σ_S dy and Σ_S dy·(x − m) from one read of (dy, x); in backward
  the same read recomputes m and q (bit-identical to the forward's), so only x, the weight and O(N + C)
  vectors are saved.
- ``_affine_kernel``: out = u·P[n,c] + v·Q[n,c] + R[(n,) c] (v optional), elementwise; the forward output
  (u = x, no v) and the input gradient (u = dy, v = x) in one pass each.

Four more run the O(N·C) algebra between them in float64 (``algebra``'s formulas, so that a call is its
launches alone, with no small torch op adding its launch latency): ``_sample_scales_kernel`` (‖x_n‖, r_n),
``_forward_coefficients_kernel`` (μ_c, σ²_c, the running-statistics update, the output's coefficients),
``_backward_channel_sums_kernel`` and ``_backward_sample_coefficients_kernel`` (``input_gradient``). Batches of
more than ``_ALGEBRA_SPLIT_ROWS`` samples first reduce over splits of the batch on a 2-d grid
(``_forward_partials_kernel``, ``_backward_partials_kernel``; the forward's splits pooled by Chan et al.'s
formula), so that no program loops over a whole large batch.

Inference — eval mode with nothing to differentiate (no_grad, or no tensor requiring a gradient) and input of
dense samples, not float64 — takes two launches and no autograd node: ``_sample_squares_kernel`` sums ‖x_n‖² in
float64 over each sample's block of memory (in parts where samples are few), and ``_inference_output_kernel``
forms r_n and the per-channel coefficients from the running statistics inside the output pass.

Values are read into float32 (float64 for float64 input). Huge finite inputs — values beyond ~1e19, whose
squares overflow float32 — are handled on the device, without a host check: every chunk of a row is multiplied
by the power of two that brings its max |x| into [1, 4) before it is squared (exact, so the usual input's chunk
moments are unchanged), and its moments are scaled back in float64; the gradient read does the same for
x − K, and the input gradient's x-term takes a per-sample power of two (docs/algorithm.md).

The module imports without Triton (``TRITON_AVAILABLE`` is then False and calling raises). With
``TRITON_INTERPRET=1`` set before Triton is first imported, the kernels run on CPU tensors through
Triton's interpreter (``INTERPRETED``); that is how the tests exercise them on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from .fused import accumulation_dtype, needs_autograd, spatial_stride
from .triton_launch import launch

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
# accumulation_dtype of each, looked up without a dispatch (torch.promote_types is an op: a dispatch a call)
_ACCUMULATION = {dtype: accumulation_dtype(dtype) for dtype in SUPPORTED_DTYPES}

# Elements per program tile: reductions keep two accumulators per element, so they use smaller tiles.
_REDUCE_TILE = 2048
_ELEMENTWISE_TILE = 4096
_MAX_BLOCK_M = 1024  # longest chunk of positions per row for NCHW-like rows
_MAX_BLOCK_C_CHANNELS_LAST = 32  # channels per tile when C is the contiguous axis
# Reductions over rows whose (n, channel block) programs are fewer than this also split each row into parts of
# at least _MIN_PART_CHUNKS chunks, one program a part (a GPU needs a few programs per multiprocessor to
# reach its bandwidth: 16×64×56×56 channels-last was 32 programs of 49 chunks each), pooled by one more launch.
_TARGET_PROGRAMS = 1024
_MIN_PART_CHUNKS = 4
_MERGE_TILE = (32, 32)  # (parts, channels) per step of the pooling of the parts
# Channels-last rows of at least this many positions keep per-position sums (the kernels' LANES): on the H200
# (session 17) 1.1-5x faster at 784-16384 positions, 0-15 % slower at 256 and fewer (one to four chunks a row).
_LANES_MIN_POSITIONS = 512
_LANES_EVERY_LAYOUT = False
# eval calls with nothing to differentiate take ``_inference`` (two launches) instead of the autograd path's four;
# off: the autograd path, for A/B timings on a GPU (gpu_check.sh's ``inference`` part)
_INFERENCE_PATH = True


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
        return _chan_combine(count, mean, sumsq, chunk_count, chunk_mean, chunk_sumsq)

    @triton.jit
    def _chan_combine(count, mean, sumsq, part_count, part_mean, part_sumsq):
        """(count, mean, Σ (x − mean)²) of two parts pooled (Chan, Golub & LeVeque 1979), float64."""
        total = count + part_count
        delta = part_mean - mean
        weight = part_count / total
        return total, mean + delta * weight, sumsq + part_sumsq + delta * delta * count * weight

    @triton.jit
    def _span(M, SPAN, BLOCK_M: tl.constexpr):
        """The positions [start, end) of this program's part (program_id(2)) of SPAN chunks of BLOCK_M positions of
        each row (chunks start where whole rows' do, and end at a multiple of BLOCK_M or at M: the loads keep
        the alignment Triton proves for whole rows)."""
        start = tl.program_id(2) * (SPAN * BLOCK_M)
        return start, tl.minimum(start + SPAN * BLOCK_M, M)

    @triton.jit
    def _deviations(v, anchor, mask):
        """x − K per element of the tile in float64, zeros outside it (K per row, float64)."""
        return tl.where(mask, v.to(tl.float64) - anchor[:, None], 0.0)

    @triton.jit
    def _shifted_moments(anchor, s1, s2, count):
        """The mean and Σ (x − mean)² of ``count`` values from Σ (x − K) and Σ (x − K)² (float64). K is a value of
        the row, so |x − K| ≤ 2·max |x − mean| and the difference loses at most ~4·count·eps of Σ (x − mean)²;
        rounding below zero is clamped (NaN passes)."""
        count = tl.maximum(count, 1).to(tl.float64)
        sumsq = s2 - s1 * (s1 / count)
        return anchor + s1 / count, tl.where(sumsq < 0.0, 0.0, sumsq)

    @triton.jit
    def _moments_kernel(
        x_ptr, mean_ptr, sumsq_ptr, C, M, SPAN, sxn, sxc, sxm,
        SCALED: tl.constexpr, LANES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) mean and Σ (x − mean)² (float64), chunks of BLOCK_M positions merged pairwise (Chan et al.),
        or (LANES) each position of the tile summing Σ (x − K) and Σ (x − K)² in float64 over the chunks, K the
        row's first value, reduced once after the loop (no reduction across the warps a chunk: channels-last
        tiles); with S = num_programs(2) > 1, of each part of SPAN chunks, into row (n·S + part) of (N·S, C)
        arrays (``_merge_parts_kernel`` pools them)."""
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        m_start, m_end = _span(M, SPAN, BLOCK_M)
        if LANES:
            anchor = tl.load(x_ptr + n.to(tl.int64) * sxn + offs_c * sxc, mask=c_ok, other=0.0).to(tl.float64)
            s1 = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
            s2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
            for start in range(m_start, m_end, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                mask = c_ok[:, None] & (offs_m < m_end)[None, :]
                d = _deviations(tl.load(base + offs_m[None, :] * sxm, mask=mask, other=0.0), anchor, mask)
                s1 += d
                s2 += d * d
            mean, sumsq = _shifted_moments(anchor, tl.sum(s1, axis=1), tl.sum(s2, axis=1), m_end - m_start)
        else:
            count = tl.zeros([BLOCK_C], dtype=tl.float64)
            mean = tl.zeros([BLOCK_C], dtype=tl.float64)
            sumsq = tl.zeros([BLOCK_C], dtype=tl.float64)
            for start in range(m_start, m_end, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                m_ok = offs_m < m_end
                mask = c_ok[:, None] & m_ok[None, :]
                v = _load_values(base + offs_m[None, :] * sxm, mask, SCALED)
                count, mean, sumsq = _chan_merge(v, mask, m_ok, count, mean, sumsq, SCALED)
        out = (n.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * C + offs_c
        tl.store(mean_ptr + out, mean, mask=c_ok)
        tl.store(sumsq_ptr + out, sumsq, mask=c_ok)

    @triton.jit
    def _lane_gradient_sums(dy_base, x_base, anchor, c_ok, m_start, m_end, sdm, sxm, WITH_MOMENTS: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
        """(mean, Σ (x − mean)², Σ dy, Σ dy·(x − K)) of positions [m_start, m_end) of the tile's rows, each sum kept
        per position in float64 over the chunks and reduced once (the moments zeros unless WITH_MOMENTS)."""
        s1 = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        g1 = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        gd = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64)
        for start in range(m_start, m_end, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mask = c_ok[:, None] & (offs_m < m_end)[None, :]
            g = tl.load(dy_base + offs_m[None, :] * sdm, mask=mask, other=0.0).to(tl.float64)
            d = _deviations(tl.load(x_base + offs_m[None, :] * sxm, mask=mask, other=0.0), anchor, mask)
            g1 += g
            gd += g * d
            if WITH_MOMENTS:
                s1 += d
                s2 += d * d
        mean, sumsq = _shifted_moments(anchor, tl.sum(s1, axis=1), tl.sum(s2, axis=1), m_end - m_start)
        return mean, sumsq, tl.sum(g1, axis=1), tl.sum(gd, axis=1)

    @triton.jit
    def _gradient_sums_kernel(
        dy_ptr, x_ptr, centre_ptr, dy_sum_ptr, dy_xc_ptr, mean_ptr, sumsq_ptr, C, M, SPAN,
        sdn, sdc, sdm, sxn, sxc, sxm,
        WITH_MOMENTS: tl.constexpr, PARTS: tl.constexpr, SCALED: tl.constexpr, LANES: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Per-(n, c) Σ dy and Σ dy·(x − centre) (float64) in one read of (dy, x).

        The dot product is taken about K — the row's first value (WITH_MOMENTS) or the given centre rounded to
        the compute dtype — chunk by chunk, x and K first scaled like ``_chan_merge``'s values (SCALED, by the
        power of two of the larger of max |x| and |K|), and moved to the centre at the end:
        Σ dy·(x − c) = Σ dy·(x − K) − (c − K)·Σ dy. WITH_MOMENTS: no centre is given; the same read also yields
        the mean m (the centre) and Σ (x − m)² exactly as ``_moments_kernel`` computes them (same chunks, same
        merge). LANES: every sum kept per position of the tile in float64 over the chunks (x − K unscaled: no
        finite input's square overflows float64), reduced once after the loop, the moments as ``_moments_kernel``'s
        LANES. PARTS (num_programs(2) parts of SPAN chunks a row): each part's sums, Σ dy·(x − K) about K
        and its moments go to row (n·S + part) of (N·S, C) arrays, for ``_merge_parts_kernel``.
        """
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        rows = n.to(tl.int64) * C + offs_c
        out = (n.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * C + offs_c
        dy_base = dy_ptr + n.to(tl.int64) * sdn + offs_c[:, None] * sdc
        x_base = x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        if WITH_MOMENTS:
            anchor = _load_values(x_ptr + n.to(tl.int64) * sxn + offs_c * sxc, c_ok, SCALED)
        else:
            centre = tl.load(centre_ptr + rows, mask=c_ok, other=0.0)
            anchor = _to_compute(centre, SCALED)
        m_start, m_end = _span(M, SPAN, BLOCK_M)
        if LANES:
            mean, sumsq, dy_sum, dy_dot = _lane_gradient_sums(
                dy_base, x_base, anchor.to(tl.float64), c_ok, m_start, m_end, sdm, sxm, WITH_MOMENTS, BLOCK_C, BLOCK_M)
        else:
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
            for start in range(m_start, m_end, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                m_ok = offs_m < m_end
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
            tl.store(mean_ptr + out, mean, mask=c_ok)
            tl.store(sumsq_ptr + out, sumsq, mask=c_ok)
        if not PARTS:  # parts stay about K: the centre is known once they are pooled
            dy_dot = dy_dot - (centre - anchor.to(tl.float64)) * dy_sum
        tl.store(dy_sum_ptr + out, dy_sum, mask=c_ok)
        tl.store(dy_xc_ptr + out, dy_dot, mask=c_ok)

    @triton.jit
    def _merge_parts_kernel(
        pmean_ptr, psumsq_ptr, pdy_sum_ptr, pdy_dot_ptr, x_ptr, centre_ptr, mean_ptr, sumsq_ptr, dy_sum_ptr, dy_xc_ptr,
        C, M, PART_SIZE, PARTS, sxn, sxc,
        MOMENTS: tl.constexpr, GRADIENTS: tl.constexpr, SCALED: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Per (n, c), the PARTS parts of a row from ``_moments_kernel`` or ``_gradient_sums_kernel`` pooled, BLOCK_P
        parts a step: MOMENTS, the mean and Σ (x − mean)² (Chan et al.'s pooling of the parts' counts — PART_SIZE
        positions, the last the rest of M —, means and sums of squared deviations); GRADIENTS, Σ dy and
        Σ dy·(x − centre), the centre the pooled mean (MOMENTS) or the given one, K as the kernel took it."""
        n = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        rows = n.to(tl.int64) * C + offs_c
        first = n.to(tl.int64) * PARTS * C
        if MOMENTS:
            mean, sumsq = _pooled_parts(pmean_ptr + first, psumsq_ptr + first, PARTS, PART_SIZE, M, offs_c, C, c_ok,
                                        BLOCK_P, BLOCK_C)
            tl.store(mean_ptr + rows, mean, mask=c_ok)
            tl.store(sumsq_ptr + rows, sumsq, mask=c_ok)
        if GRADIENTS:
            dy_sum = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
            dy_dot = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
            for start in range(0, PARTS, BLOCK_P):
                offs_p = start + tl.arange(0, BLOCK_P)
                dy_sum += _channel_tile(pdy_sum_ptr + first, offs_p, offs_c, PARTS, C, c_ok)
                dy_dot += _channel_tile(pdy_dot_ptr + first, offs_p, offs_c, PARTS, C, c_ok)
            dy_sum = tl.sum(dy_sum, axis=0)
            dy_dot = tl.sum(dy_dot, axis=0)
            if MOMENTS:
                anchor = _load_values(x_ptr + n.to(tl.int64) * sxn + offs_c * sxc, c_ok, SCALED)
                centre = mean
            else:
                centre = tl.load(centre_ptr + rows, mask=c_ok, other=0.0)
                anchor = _to_compute(centre, SCALED)
            tl.store(dy_sum_ptr + rows, dy_sum, mask=c_ok)
            tl.store(dy_xc_ptr + rows, dy_dot - (centre - anchor.to(tl.float64)) * dy_sum, mask=c_ok)

    @triton.jit
    def _store_as(ptrs, value, mask):
        """Store float64 values in the pointers' dtype, through float32 for narrower ones (as torch's casts from
        float64 do)."""
        ty = ptrs.dtype.element_ty
        if ty != tl.float64:
            value = value.to(tl.float32)
        tl.store(ptrs, value.to(ty), mask=mask)

    @triton.jit
    def _sample_scale(squares, C, M, l2_eps, RESCALE: tl.constexpr):
        """(‖x_n‖, r_n) from ‖x_n‖² (float64): the norm with NaN read as inf, r_n = target / max(‖x_n‖, l2_eps),
        target = sqrt(C·M) (RESCALE) or 1."""
        norm = tl.sqrt(squares)
        norm = tl.where(norm != norm, float("inf"), norm)
        if RESCALE:
            target = tl.sqrt(tl.cast(C, tl.float64) * M)
        else:
            target = 1.0
        return norm, target / tl.maximum(norm, l2_eps)

    @triton.jit
    def _sample_scales_kernel(
        mean_ptr, sumsq_ptr, scale_ptr, norm_ptr, C, M, l2_eps: tl.float64,
        RESCALE: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Per sample: ‖x_n‖ = sqrt(Σ_c q[n,c] + M·m[n,c]²) and r_n (``_sample_scale``)."""
        rows = tl.program_id(0).to(tl.int64) * C
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, C, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            ok = offs < C
            m = tl.load(mean_ptr + rows + offs, mask=ok, other=0.0)
            total += tl.load(sumsq_ptr + rows + offs, mask=ok, other=0.0) + M * m * m
        norm, scale = _sample_scale(tl.sum(total, axis=0), C, M, l2_eps, RESCALE)
        tl.store(norm_ptr + tl.program_id(0), norm)
        tl.store(scale_ptr + tl.program_id(0), scale)

    @triton.jit
    def _channel_tile(ptr, offs_n, offs_c, N, C, c_ok):
        """The (BLOCK_N, BLOCK_C) tile of an (N, C) float64 array, zeros outside it."""
        mask = (offs_n < N)[:, None] & c_ok[None, :]
        return tl.load(ptr + offs_n.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)

    @triton.jit
    def _centred_scaled_means(mean_ptr, r, mu, offs_n, offs_c, N, C, c_ok):
        """The tile of r_n·m[n,c] − μ_c (zeros outside it) for r of shape (BLOCK_N, 1)."""
        scaled = r * _channel_tile(mean_ptr, offs_n, offs_c, N, C, c_ok) - mu[None, :]
        return tl.where((offs_n < N)[:, None], scaled, 0.0)

    @triton.jit
    def _pooled_moments(mean_ptr, sumsq_ptr, scale_ptr, row_start, row_end, offs_c, C, c_ok,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Over samples [row_start, row_end), per channel (float64): the mean of r_n·m[n,c], Σ (r_n·m[n,c] − that
        mean)² and Σ r_n²·q[n,c]."""
        total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        for start in range(row_start, row_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            r = tl.load(scale_ptr + offs_n, mask=offs_n < row_end, other=0.0)
            total += r[:, None] * _channel_tile(mean_ptr, offs_n, offs_c, row_end, C, c_ok)
        mean = tl.sum(total, axis=0) / tl.maximum(row_end - row_start, 1)  # zeros for no samples (an empty rank)
        within = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        between = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        for start in range(row_start, row_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            r = tl.load(scale_ptr + offs_n, mask=offs_n < row_end, other=0.0)[:, None]
            within += r * r * _channel_tile(sumsq_ptr, offs_n, offs_c, row_end, C, c_ok)
            d = _centred_scaled_means(mean_ptr, r, mean, offs_n, offs_c, row_end, C, c_ok)
            between += d * d
        return mean, tl.sum(between, axis=0), tl.sum(within, axis=0)

    @triton.jit
    def _split_rows(N, ROWS):
        """The samples [start, end) of this program's split (program_id(1)) of ROWS samples."""
        row_start = tl.program_id(1) * ROWS
        return row_start, tl.minimum(row_start + ROWS, N)

    @triton.jit
    def _forward_partials_kernel(
        mean_ptr, sumsq_ptr, scale_ptr, part_ptr, N, C, ROWS, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Large batches: ``_pooled_moments`` of each split of ROWS samples into part[0 | 1 | 2, split, c], so that
        the per-channel reduction over n runs on a grid of (channel blocks, splits)."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        row_start, row_end = _split_rows(N, ROWS)
        mean, between, within = _pooled_moments(mean_ptr, sumsq_ptr, scale_ptr, row_start, row_end, offs_c, C, c_ok,
                                                BLOCK_N, BLOCK_C)
        plane = tl.num_programs(1).to(tl.int64) * C
        out = part_ptr + tl.program_id(1).to(tl.int64) * C + offs_c
        tl.store(out, mean, mask=c_ok)
        tl.store(out + plane, between, mask=c_ok)
        tl.store(out + 2 * plane, within, mask=c_ok)

    @triton.jit
    def _part_counts(offs_p, parts, part_size, total):
        """How many values each of ``parts`` parts holds: ``part_size``, the last the rest of ``total`` (zeros past
        the parts), float64."""
        return tl.where(offs_p < parts, tl.minimum(part_size, total - offs_p * part_size), 0).to(tl.float64)

    @triton.jit
    def _pooled_parts(mean_ptr, sumsq_ptr, parts, part_size, total, offs_c, C, c_ok, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        """Per channel, the mean and Σ (x − mean)² of ``total`` values from the (parts, C) means and sums of squared
        deviations of their parts (Chan, Golub & LeVeque's pooling; parts of ``part_size``, the last the rest),
        BLOCK_P parts a step."""
        weighted = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
        for start in range(0, parts, BLOCK_P):
            offs_p = start + tl.arange(0, BLOCK_P)
            counts = _part_counts(offs_p, parts, part_size, total)
            weighted += counts[:, None] * _channel_tile(mean_ptr, offs_p, offs_c, parts, C, c_ok)
        mean = tl.sum(weighted, axis=0) / total
        squares = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
        for start in range(0, parts, BLOCK_P):
            offs_p = start + tl.arange(0, BLOCK_P)
            counts = _part_counts(offs_p, parts, part_size, total)
            d = tl.where((offs_p < parts)[:, None], _channel_tile(mean_ptr, offs_p, offs_c, parts, C, c_ok)
                         - mean[None, :], 0.0)
            squares += _channel_tile(sumsq_ptr, offs_p, offs_c, parts, C, c_ok) + counts[:, None] * d * d
        return mean, tl.sum(squares, axis=0)

    @triton.jit
    def _merged_partials(part_ptr, N, C, ROWS, offs_c, c_ok, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """μ_c, Σ (r_n m − μ_c)² and Σ r_n² q of the whole batch from ``_forward_partials_kernel``'s splits (Chan,
        Golub & LeVeque's pooling of the splits' counts, means and sums of squared deviations)."""
        splits = tl.cdiv(N, ROWS)
        plane = tl.cast(splits, tl.int64) * C
        mu, between = _pooled_parts(part_ptr, part_ptr + plane, splits, ROWS, N, offs_c, C, c_ok, BLOCK_N, BLOCK_C)
        within = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        for start in range(0, splits, BLOCK_N):
            offs_s = start + tl.arange(0, BLOCK_N)
            within += _channel_tile(part_ptr + 2 * plane, offs_s, offs_c, splits, C, c_ok)
        return mu, between, tl.sum(within, axis=0)

    @triton.jit
    def _batch_moments(mean_ptr, sumsq_ptr, scale_ptr, part_ptr, N, C, ROWS, offs_c, c_ok, SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """μ_c, Σ (r_n m − μ_c)² and Σ r_n² q over the whole batch: from the splits' partials (SPLIT) or directly."""
        if SPLIT:
            mu, between, within = _merged_partials(part_ptr, N, C, ROWS, offs_c, c_ok, BLOCK_N, BLOCK_C)
        else:
            mu, between, within = _pooled_moments(mean_ptr, sumsq_ptr, scale_ptr, 0, N, offs_c, C, c_ok,
                                                  BLOCK_N, BLOCK_C)
        return mu, between, within

    @triton.jit
    def _local_channel_sums_kernel(
        mean_ptr, sumsq_ptr, scale_ptr, part_ptr, sums_ptr, N, C, M, ROWS,
        SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Synchronized L2BN: this rank's count N·M and per-channel Σz and Σz² (z = r_n x, float64) packed as
        sums[0 | 1 + c | 1 + C + c] for one all-reduce; Σz² = M·Σ (r_n m − μ)² + Σ r_n² q + count·μ²."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mu, between, within = _batch_moments(mean_ptr, sumsq_ptr, scale_ptr, part_ptr, N, C, ROWS, offs_c, c_ok,
                                             SPLIT, BLOCK_N, BLOCK_C)
        count = tl.cast(N, tl.float64) * M
        tl.store(sums_ptr + 1 + offs_c, count * mu, mask=c_ok)
        tl.store(sums_ptr + 1 + C + offs_c, M * between + within + count * mu * mu, mask=c_ok)
        if tl.program_id(0) == 0:
            tl.store(sums_ptr, count)

    @triton.jit
    def _running_statistics(rmean_ptr, rvar_ptr, offs_c, c_ok):
        """(μ_c, σ²_c) from the running statistics, float64."""
        mu = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        return mu, tl.load(rvar_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float64)

    @triton.jit
    def _channel_affine(mu, var, weight_ptr, bias_ptr, offs_c, c_ok, eps, HAS_WEIGHT: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
        """(invstd_c, gain_c = γ_c·invstd_c, shift_c = β_c − μ_c·gain_c), float64: y = z·gain_c + shift_c."""
        invstd = 1.0 / tl.sqrt(var + eps)
        gain = invstd
        if HAS_WEIGHT:
            gain = gain * tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        shift = -mu * gain
        if HAS_BIAS:
            shift += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        return invstd, gain, shift

    @triton.jit
    def _forward_coefficients_kernel(
        mean_ptr, sumsq_ptr, scale_ptr, part_ptr, sums_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
        gain_ptr, shift_ptr, mu_ptr, invstd_ptr, N, C, M, ROWS, eps: tl.float64, momentum: tl.float64,
        TRAINING: tl.constexpr, SPLIT: tl.constexpr, SUMS_IN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Per channel: μ_c and σ²_c of z = r_n x (TRAINING: pooled as in ``channel_statistics`` — from the splits'
        partials when SPLIT, from all ranks' ``_local_channel_sums_kernel`` sums when SUMS_IN — and the running
        statistics updated like ``update_running_stats``; else the running ones), invstd, and the output's
        coefficients gain_c = γ_c·invstd_c (y = x·r_n·gain_c + shift_c) and shift_c = β_c − μ_c·gain_c."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        if TRAINING:
            if SUMS_IN:  # E[z²] − E[z]² in float64, as sync.py's torch ops (no count: zeros)
                count = tl.load(sums_ptr)
                values = tl.maximum(count, 1.0)
                mu = tl.load(sums_ptr + 1 + offs_c, mask=c_ok, other=0.0) / values
                var = tl.maximum(tl.load(sums_ptr + 1 + C + offs_c, mask=c_ok, other=0.0) / values - mu * mu, 0.0)
            else:
                mu, between, within = _batch_moments(mean_ptr, sumsq_ptr, scale_ptr, part_ptr, N, C, ROWS, offs_c,
                                                     c_ok, SPLIT, BLOCK_N, BLOCK_C)
                count = tl.cast(N, tl.float64) * M
                var = within / count + between / N
            if HAS_RUNNING:
                old_mean = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
                old_var = tl.load(rvar_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
                new_mean = old_mean + momentum * (mu - old_mean)
                new_var = old_var + momentum * (var * (count / (count - 1.0)) - old_var)
                _store_as(rmean_ptr + offs_c, new_mean, c_ok)
                _store_as(rvar_ptr + offs_c, new_var, c_ok)
        else:
            mu, var = _running_statistics(rmean_ptr, rvar_ptr, offs_c, c_ok)
        invstd, gain, shift = _channel_affine(mu, var, weight_ptr, bias_ptr, offs_c, c_ok, eps, HAS_WEIGHT, HAS_BIAS)
        tl.store(mu_ptr + offs_c, mu, mask=c_ok)
        tl.store(invstd_ptr + offs_c, invstd, mask=c_ok)
        tl.store(gain_ptr + offs_c, gain, mask=c_ok)
        _store_as(shift_ptr + offs_c, shift, c_ok)

    @triton.jit
    def _gradient_channel_sums(dy_sum_ptr, dy_xc_ptr, mean_ptr, scale_ptr, mu, row_start, row_end, offs_c, C, c_ok,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Over samples [row_start, row_end), per channel: Σ Σdy and Σ (r_n·Σdy·(x − m) + (r_n m − μ)·Σdy)."""
        bias_total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        weight_total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        for start in range(row_start, row_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            r = tl.load(scale_ptr + offs_n, mask=offs_n < row_end, other=0.0)[:, None]
            dy_sum = _channel_tile(dy_sum_ptr, offs_n, offs_c, row_end, C, c_ok)
            zc = _centred_scaled_means(mean_ptr, r, mu, offs_n, offs_c, row_end, C, c_ok)
            bias_total += dy_sum
            weight_total += r * _channel_tile(dy_xc_ptr, offs_n, offs_c, row_end, C, c_ok) + zc * dy_sum
        return tl.sum(bias_total, axis=0), tl.sum(weight_total, axis=0)

    @triton.jit
    def _backward_partials_kernel(
        dy_sum_ptr, dy_xc_ptr, mean_ptr, scale_ptr, mu_ptr, part_ptr, N, C, ROWS,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Large batches: ``_gradient_channel_sums`` of each split of ROWS samples into part[0 | 1, split, c]."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mu = tl.load(mu_ptr + offs_c, mask=c_ok, other=0.0)
        row_start, row_end = _split_rows(N, ROWS)
        bias_sum, weight_sum = _gradient_channel_sums(dy_sum_ptr, dy_xc_ptr, mean_ptr, scale_ptr, mu, row_start,
                                                      row_end, offs_c, C, c_ok, BLOCK_N, BLOCK_C)
        out = part_ptr + tl.program_id(1).to(tl.int64) * C + offs_c
        tl.store(out, bias_sum, mask=c_ok)
        tl.store(out + tl.num_programs(1).to(tl.int64) * C, weight_sum, mask=c_ok)

    @triton.jit
    def _store_gradient_coefficients(k_ptr, bias_term_ptr, gain, invstd, grad_weight, grad_bias, count, offs_c, c_ok):
        """Batch statistics' terms of dx: k = γ·invstd²·Σdy·ẑ / count and γ·invstd·Σdy / count."""
        tl.store(k_ptr + offs_c, gain * invstd * grad_weight / count, mask=c_ok)
        tl.store(bias_term_ptr + offs_c, gain * grad_bias / count, mask=c_ok)

    @triton.jit
    def _synced_gradient_coefficients_kernel(
        sums_ptr, count_ptr, gain_ptr, invstd_ptr, k_ptr, bias_term_ptr, C, BLOCK_C: tl.constexpr,
    ):
        """Synchronized L2BN: ``_store_gradient_coefficients`` from all ranks' Σ dy and Σ dy·ẑ (sums[0 | 1, c],
        all-reduced) and the global count."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        grad_bias = tl.load(sums_ptr + offs_c, mask=c_ok, other=0.0)
        grad_weight = tl.load(sums_ptr + C + offs_c, mask=c_ok, other=0.0)
        gain = tl.load(gain_ptr + offs_c, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
        _store_gradient_coefficients(k_ptr, bias_term_ptr, gain, invstd, grad_weight, grad_bias, tl.load(count_ptr),
                                     offs_c, c_ok)

    @triton.jit
    def _backward_channel_sums_kernel(
        dy_sum_ptr, dy_xc_ptr, mean_ptr, scale_ptr, part_ptr, mu_ptr, invstd_ptr, weight_ptr,
        grad_weight_ptr, grad_bias_ptr, gain_ptr, k_ptr, bias_term_ptr, sums_ptr, N, C, M, ROWS,
        TRAINING: tl.constexpr, SPLIT: tl.constexpr, SUMS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Per channel (``input_gradient``'s reductions over n; from the splits' partials when SPLIT): Σ dy,
        Σ dy·ẑ = invstd·Σ_n (r_n·Σdy·(x − m) + (r_n m − μ)·Σdy), and (TRAINING) ``_store_gradient_coefficients``.
        SUMS_OUT (synchronized L2BN): the two sums also in float64 into sums[0 | 1, c], for the all-reduce."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mu = tl.load(mu_ptr + offs_c, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
        if SPLIT:
            splits = tl.cdiv(N, ROWS)
            bias_total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
            weight_total = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
            for start in range(0, splits, BLOCK_N):
                offs_s = start + tl.arange(0, BLOCK_N)
                bias_total += _channel_tile(part_ptr, offs_s, offs_c, splits, C, c_ok)
                weight_total += _channel_tile(part_ptr + tl.cast(splits, tl.int64) * C, offs_s, offs_c, splits, C, c_ok)
            grad_bias, weight_sum = tl.sum(bias_total, axis=0), tl.sum(weight_total, axis=0)
        else:
            grad_bias, weight_sum = _gradient_channel_sums(dy_sum_ptr, dy_xc_ptr, mean_ptr, scale_ptr, mu, 0, N, offs_c,
                                                           C, c_ok, BLOCK_N, BLOCK_C)
        grad_weight = invstd * weight_sum
        gain = invstd
        if HAS_WEIGHT:
            gain = gain * tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        _store_as(grad_bias_ptr + offs_c, grad_bias, c_ok)
        _store_as(grad_weight_ptr + offs_c, grad_weight, c_ok)
        tl.store(gain_ptr + offs_c, gain, mask=c_ok)
        if SUMS_OUT:
            tl.store(sums_ptr + offs_c, grad_bias, mask=c_ok)
            tl.store(sums_ptr + C + offs_c, grad_weight, mask=c_ok)
        if TRAINING:
            _store_gradient_coefficients(k_ptr, bias_term_ptr, gain, invstd, grad_weight, grad_bias,
                                         tl.cast(N, tl.float64) * M, offs_c, c_ok)

    @triton.jit
    def _backward_sample_coefficients_kernel(
        dy_sum_ptr, dy_xc_ptr, mean_ptr, sumsq_ptr, scale_ptr, norm_ptr, mu_ptr, gain_ptr, k_ptr, bias_term_ptr,
        dy_coef_ptr, x_coef_ptr, shift_ptr, factor_ptr, C, M, l2_eps: tl.float64,
        TRAINING: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Per sample (``input_gradient``'s rest): T_n = Σ_c (Σdz·(x − m) + m·Σdz), u_n = T_n / ‖x_n‖² (0 where the
        norm was clamped), and dx's coefficients dy_coef = r·γ·invstd, x_coef = r·(−k·r − u_n) / F_n,
        shift = r·(k·μ − γ·invstd·Σdy/count) with F_n the power of two of ``huge_sample_factors(‖x_n‖, 0)``."""
        n = tl.program_id(0)
        rows = n.to(tl.int64) * C
        r = tl.load(scale_ptr + n)
        norm = tl.load(norm_ptr + n)
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, C, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            ok = offs < C
            gain = tl.load(gain_ptr + offs, mask=ok, other=0.0)
            m = tl.load(mean_ptr + rows + offs, mask=ok, other=0.0)
            dz_sum = gain * tl.load(dy_sum_ptr + rows + offs, mask=ok, other=0.0)
            dz_xc = gain * tl.load(dy_xc_ptr + rows + offs, mask=ok, other=0.0)
            if TRAINING:
                k = tl.load(k_ptr + offs, mask=ok, other=0.0)
                bias_term = tl.load(bias_term_ptr + offs, mask=ok, other=0.0)
                zc = r * m - tl.load(mu_ptr + offs, mask=ok, other=0.0)
                dz_sum -= M * (bias_term + k * zc)
                dz_xc -= k * r * tl.load(sumsq_ptr + rows + offs, mask=ok, other=0.0)
            total += tl.where(ok, dz_xc + m * dz_sum, 0.0)
        t = tl.sum(total, axis=0)
        unclamped = norm > l2_eps
        u = tl.where(unclamped, t / tl.where(unclamped, norm * norm, 1.0), 0.0)
        # huge_sample_factors: 2^-e for norm = f·2^e (f in [0.5, 1)) where 2^32 <= norm < inf, else 1; the
        # biased exponent is clamped so that 2^-e stays a normal float64 (norms beyond 2^1022 only)
        biased = (norm.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        power = ((2045 - tl.minimum(biased, 2044)) << 52).to(tl.float64, bitcast=True)
        factor = tl.where((norm >= 4294967296.0) & (norm < float("inf")), power, 1.0)
        tl.store(factor_ptr + n, factor.to(factor_ptr.dtype.element_ty))
        for start in range(0, C, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            ok = offs < C
            gain = tl.load(gain_ptr + offs, mask=ok, other=0.0)
            x_coef = -u
            shift = tl.zeros([BLOCK_C], dtype=tl.float64)
            if TRAINING:
                k = tl.load(k_ptr + offs, mask=ok, other=0.0)
                x_coef -= k * r
                mu = tl.load(mu_ptr + offs, mask=ok, other=0.0)
                shift = r * (k * mu - tl.load(bias_term_ptr + offs, mask=ok, other=0.0))
            _store_as(dy_coef_ptr + rows + offs, r * gain, ok)
            _store_as(x_coef_ptr + rows + offs, r * x_coef / factor, ok)
            _store_as(shift_ptr + rows + offs, shift, ok)

    @triton.jit
    def _elementwise_tile(C, M, num_m_blocks, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
        """This program's tile of the elementwise passes (grid (N·⌈M/BLOCK_M⌉, ⌈C/BLOCK_C⌉)): its sample n, channel
        and position offsets, the channels' mask and the tile's."""
        pid = tl.program_id(0)
        n = pid // num_m_blocks
        offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        return n, offs_c, offs_m, c_ok, c_ok[:, None] & (offs_m < M)[None, :]

    @triton.jit
    def _affine_kernel(
        out_ptr, u_ptr, v_ptr, p_ptr, pn_ptr, q_ptr, r_ptr, vf_ptr, C, M, num_m_blocks, srn,
        son, soc, som, sun, suc, sum_, svn, svc, svm,
        P_FACTORED: tl.constexpr, HAS_V: tl.constexpr, HAS_VF: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """out = u·P[n,c] + (v·F[n])·Q[n,c] + R[n,c] (the v term only if HAS_V, F = 1 unless HAS_VF), computed
        in R's dtype; R's row stride ``srn`` is 0 for a per-channel shift. P_FACTORED: P[n,c] = pn[n]·p[c], both
        float64, multiplied in float64 and then rounded."""
        n, offs_c, offs_m, c_ok, mask = _elementwise_tile(C, M, num_m_blocks, BLOCK_C, BLOCK_M)
        acc_ty = r_ptr.dtype.element_ty
        rows = n.to(tl.int64) * C + offs_c
        if P_FACTORED:
            p = (tl.load(pn_ptr + n) * tl.load(p_ptr + offs_c, mask=c_ok, other=0.0)).to(acc_ty)
        else:
            p = tl.load(p_ptr + rows, mask=c_ok, other=0.0)
        n64 = n.to(tl.int64)
        r = tl.load(r_ptr + n64 * srn + offs_c, mask=c_ok, other=0.0)
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

    @triton.jit
    def _sample_squares_kernel(x_ptr, part_ptr, D, sxn, SPAN, BLOCK_M: tl.constexpr):
        """Inference, pass 1: Σ x² in float64 over one part (program_id(1)) of SPAN chunks of BLOCK_M values of
        sample program_id(0), whose D values lie in one dense block (NCHW or channels-last alike), into
        part[n, part]. Squares of float32 values are exact in float64 and cannot overflow it."""
        n = tl.program_id(0)
        start = tl.program_id(1) * (SPAN * BLOCK_M)
        end = tl.minimum(start + SPAN * BLOCK_M, D)
        base = x_ptr + n.to(tl.int64) * sxn
        total = tl.zeros([BLOCK_M], dtype=tl.float64)
        for chunk in range(start, end, BLOCK_M):
            offs = chunk + tl.arange(0, BLOCK_M)
            v = tl.load(base + offs, mask=offs < end, other=0.0).to(tl.float64)
            total += v * v
        tl.store(part_ptr + n.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(total, axis=0))

    @triton.jit
    def _inference_output_kernel(
        x_ptr, out_ptr, part_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, C, M, parts, num_m_blocks,
        sxn, sxc, sxm, son, soc, som, eps: tl.float64, l2_eps: tl.float64,
        RESCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Inference, pass 2: y = x·(r_n·gain_c) + shift_c over one (channels, positions) tile, r_n from the sample's
        parts of ‖x_n‖² (summed in a fixed order) and gain_c, shift_c from the running statistics — the
        arithmetic of ``_affine_kernel``'s factored output."""
        n, offs_c, offs_m, c_ok, mask = _elementwise_tile(C, M, num_m_blocks, BLOCK_C, BLOCK_M)
        n64 = n.to(tl.int64)
        squares = tl.zeros([BLOCK_P], dtype=tl.float64)
        for start in range(0, parts, BLOCK_P):
            offs_p = start + tl.arange(0, BLOCK_P)
            squares += tl.load(part_ptr + n64 * parts + offs_p, mask=offs_p < parts, other=0.0)
        _, scale = _sample_scale(tl.sum(squares, axis=0), C, M, l2_eps, RESCALE)
        mu, var = _running_statistics(rmean_ptr, rvar_ptr, offs_c, c_ok)
        _, gain, shift = _channel_affine(mu, var, weight_ptr, bias_ptr, offs_c, c_ok, eps, HAS_WEIGHT, HAS_BIAS)
        x = tl.load(x_ptr + n64 * sxn + offs_c[:, None] * sxc + offs_m[None, :] * sxm, mask=mask, other=0.0)
        y = x.to(tl.float32) * (scale * gain).to(tl.float32)[:, None] + shift.to(tl.float32)[:, None]
        out = out_ptr + n64 * son + offs_c[:, None] * soc + offs_m[None, :] * som
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the host's grids and splits (``triton.cdiv`` is a ConstexprFunction: 2-3 µs a call)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


class _Rows(NamedTuple):
    """A tensor read as rows (N, C, M) through its own strides: the kernels take ``t`` and ``strides`` (no view
    op a call: each would cost a dispatch of host time)."""

    t: Tensor
    n: int
    c: int
    m: int
    strides: tuple[int, int, int]


def _as_rows(t: Tensor, *, writable: bool = False) -> _Rows:
    """``t`` as rows, or a dense copy of it where its spatial dims do not flatten to one stride (``writable``:
    refused instead, since writes must land in ``t``)."""
    stride_m = spatial_stride(t)
    if stride_m is None:
        if writable:
            raise ValueError(
                f"out must flatten to an (N, C, M) view; got strides {t.stride()} for shape {tuple(t.shape)}"
            )
        t = t.contiguous()
        stride_m = spatial_stride(t)
    shape, strides = t.shape, t.stride()
    return _Rows(t, shape[0], shape[1], math.prod(shape[2:]), (strides[0], strides[1], stride_m))


def _empty_rows_like(rows: _Rows) -> _Rows:
    """A new tensor of ``rows.t``'s shape and layout, as rows: the geometry reused where ``empty_like`` keeps the
    strides (dense tensors), found again where it does not (a strided view gives a contiguous tensor)."""
    out = torch.empty_like(rows.t)
    return rows._replace(t=out) if out.stride() == rows.t.stride() else _as_rows(out, writable=True)


def _channels_contiguous(rows: _Rows) -> bool:
    """Whether C is the unit-stride axis of the rows (channels_last)."""
    _, stride_c, stride_m = rows.strides
    return rows.m > 1 and stride_c == 1 and stride_m != 1


def _lanes(rows: _Rows) -> bool:
    """Whether the reductions keep their sums per tile position (the kernels' LANES) instead of reducing every
    chunk: for channels-last rows of ``_LANES_MIN_POSITIONS`` or more, whose reductions over M run across warps;
    for every layout with ``_LANES_EVERY_LAYOUT`` (measured on the H200: NCHW 0-3 % slower in the median, kept
    off)."""
    return (_channels_contiguous(rows) and rows.m >= _LANES_MIN_POSITIONS) or _LANES_EVERY_LAYOUT


def _tile(rows: _Rows, elements: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M) for rows (N, C, M): long along the unit-stride axis, ``elements`` in all."""
    if _channels_contiguous(rows):
        block_c = min(_next_pow2(rows.c), _MAX_BLOCK_C_CHANNELS_LAST)
        block_m = min(_next_pow2(rows.m), max(1, elements // block_c))
    else:
        block_m = min(_next_pow2(rows.m), _MAX_BLOCK_M)
        block_c = min(_next_pow2(rows.c), max(1, elements // block_m))
    return block_c, block_m


def _reduction_tile(rows: _Rows) -> tuple[int, int]:
    """The reductions' (BLOCK_C, BLOCK_M): ``_REDUCE_TILE`` elements, half that where their per-position float64
    sums (LANES) take four times the registers (the gradient sums' 2048-element tile needed
    213 registers a thread in triton 3.6's sm_90a build, 118 at 1024)."""
    return _tile(rows, _REDUCE_TILE // 2 if _lanes(rows) else _REDUCE_TILE)


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


def _parts(programs: int, chunks: int) -> tuple[int, int]:
    """(parts, span): a reduction over ``chunks`` chunks, one per each of ``programs`` programs, split into
    ``parts`` programs of ``span`` chunks where ``programs`` alone are fewer than ``_TARGET_PROGRAMS`` (each part
    at least ``_MIN_PART_CHUNKS``); else one part of every chunk."""
    parts = min(_cdiv(_TARGET_PROGRAMS, max(programs, 1)), chunks // _MIN_PART_CHUNKS)
    if parts < 2 or programs == 0:
        return 1, chunks
    span = _cdiv(chunks, parts)
    return _cdiv(chunks, span), span


def _row_parts(rows: _Rows, block_c: int, block_m: int) -> tuple[int, int]:
    """(parts, span) of each row's reduction over chunks of ``block_m`` positions, (n, channel block) programs."""
    return _parts(rows.n * _cdiv(rows.c, block_c), _cdiv(rows.m, block_m))


def _merge_parts(rows: _Rows, parts: int, part_size: int, partial: tuple[Tensor, ...], whole: tuple[Tensor, ...],
                 centre: Tensor | None = None) -> None:
    """``_merge_parts_kernel``: each part's (mean, sumsq), (mean, sumsq, dy_sum, dy_dot) or — about a given
    ``centre`` — (dy_sum, dy_dot) pooled into ``whole``, the same quantities of whole rows (one launch)."""
    gradients, moments = len(whole) == 4 or centre is not None, len(whole) == 4 or centre is None
    if moments and gradients:
        (p_mean, p_sumsq, p_dy_sum, p_dy_dot), (mean, sumsq, dy_sum, dy_xc) = partial, whole
    elif moments:
        (p_mean, p_sumsq), (mean, sumsq) = partial, whole
        p_dy_sum, p_dy_dot, dy_sum, dy_xc = p_mean, p_sumsq, mean, sumsq  # not read or written
    else:
        (p_dy_sum, p_dy_dot), (dy_sum, dy_xc) = partial, whole
        p_mean, p_sumsq, mean, sumsq = p_dy_sum, p_dy_dot, dy_sum, dy_xc  # not read or written
    block_p, block_c = _MERGE_TILE
    launch(
        _merge_parts_kernel, (rows.n, _cdiv(rows.c, block_c)),
        p_mean, p_sumsq, p_dy_sum, p_dy_dot, rows.t, _optional(centre, mean), mean, sumsq, dy_sum, dy_xc,
        rows.c, rows.m, part_size, parts, rows.strides[0], rows.strides[1],
        MOMENTS=moments, GRADIENTS=gradients, SCALED=_scaled(rows.t), BLOCK_P=block_p, BLOCK_C=block_c,
    )


def _moments(rows: _Rows) -> tuple[Tensor, Tensor]:
    x = rows.t
    mean = torch.empty(rows.n, rows.c, dtype=torch.float64, device=x.device)
    sumsq = torch.empty_like(mean)
    block_c, block_m = _reduction_tile(rows)
    parts, span = _row_parts(rows, block_c, block_m)
    out = (mean, sumsq) if parts == 1 else tuple(
        torch.empty(rows.n * parts, rows.c, dtype=torch.float64, device=x.device) for _ in range(2))
    launch(
        _moments_kernel, (rows.n, _cdiv(rows.c, block_c), parts),
        x, *out, rows.c, rows.m, span, *rows.strides, SCALED=_scaled(x), LANES=_lanes(rows),
        BLOCK_C=block_c, BLOCK_M=block_m,
    )
    if parts > 1:
        _merge_parts(rows, parts, span * block_m, out, (mean, sumsq))
    return mean, sumsq


def sample_channel_moments_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """(m, q): per-(n, c) mean and Σ_S (x − m)² of an (N, C, *S) tensor, (N, C) float64 each, one read of x."""
    with _on_device(x):
        return _moments(_as_rows(x))


def _gradient_sums(dy_rows: _Rows, x_rows: _Rows, centre: Tensor | None) -> tuple[Tensor, ...]:
    x = x_rows.t
    n, num_channels = x_rows.n, x_rows.c
    with_moments = centre is None
    dy_sum = torch.empty(n, num_channels, dtype=torch.float64, device=x.device)
    dy_xc = torch.empty_like(dy_sum)
    if with_moments:  # the kernel writes the mean (the centre) and q; it reads no centre
        mean, sumsq = torch.empty_like(dy_sum), torch.empty_like(dy_sum)
        centre = mean
    else:
        centre = centre.to(torch.float64).contiguous()
        mean = sumsq = centre  # not written
    block_c, block_m = _reduction_tile(x_rows)  # the forward's tiles and parts: the same moments, bit for bit
    parts, span = _row_parts(x_rows, block_c, block_m)
    whole = (mean, sumsq, dy_sum, dy_xc) if with_moments else (dy_sum, dy_xc)
    partial = whole if parts == 1 else tuple(
        torch.empty(n * parts, num_channels, dtype=torch.float64, device=x.device) for _ in whole)
    p_mean, p_sumsq, p_dy_sum, p_dy_xc = partial if with_moments else (mean, sumsq) + partial
    launch(
        _gradient_sums_kernel, (n, _cdiv(num_channels, block_c), parts),
        dy_rows.t, x_rows.t, centre, p_dy_sum, p_dy_xc, p_mean, p_sumsq, num_channels, x_rows.m, span,
        *dy_rows.strides, *x_rows.strides,
        WITH_MOMENTS=with_moments, PARTS=parts > 1, SCALED=_scaled(x), LANES=_lanes(x_rows),
        BLOCK_C=block_c, BLOCK_M=block_m,
    )
    if parts > 1:
        _merge_parts(x_rows, parts, span * block_m, partial, whole, None if with_moments else centre)
    return (mean, sumsq, dy_sum, dy_xc) if with_moments else (dy_sum, dy_xc)


def gradient_sums_triton(dy: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_S dy, Σ_S dy·(x − centre)) per (n, c), float64, from one read of (dy, x)."""
    with _on_device(x):
        return _gradient_sums(_as_rows(dy), _as_rows(x), centre)


def moments_and_gradient_sums_triton(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m, q, Σ_S dy, Σ_S dy·(x − m)) per (n, c), float64, from one read of (dy, x); m and q equal
    :func:`sample_channel_moments_triton`'s, so backward need not save them."""
    with _on_device(x):
        return _gradient_sums(_as_rows(dy), _as_rows(x), None)


def _affine(
    out_rows: _Rows, u_rows: _Rows, p: Tensor, r: Tensor, v_rows: _Rows | None, q: Tensor | None,
    v_factor: Tensor | None, p_factor: Tensor | None = None,
) -> Tensor:
    """:func:`affine_triton` on rows (the callers' own, so that no tensor's geometry is found twice a call)."""
    n, num_channels = out_rows.n, out_rows.c
    p = p.contiguous()
    r = r.contiguous() if r.dim() in (1, 2) else r.reshape(num_channels).contiguous()
    has_v = v_rows is not None
    if has_v:
        q = q.contiguous()
    else:
        v_rows, q = u_rows, p
    has_vf = v_factor is not None
    v_factor = v_factor.to(r.dtype).contiguous() if has_vf else r
    block_c, block_m = _tile(out_rows, _ELEMENTWISE_TILE)
    num_m_blocks = _cdiv(out_rows.m, block_m)
    launch(
        _affine_kernel, (n * num_m_blocks, _cdiv(num_channels, block_c)),
        out_rows.t, u_rows.t, v_rows.t, p, p if p_factor is None else p_factor, q, r, v_factor, num_channels,
        out_rows.m, num_m_blocks, num_channels if r.dim() == 2 else 0, *out_rows.strides, *u_rows.strides,
        *v_rows.strides,
        P_FACTORED=p_factor is not None, HAS_V=has_v, HAS_VF=has_vf, BLOCK_C=block_c, BLOCK_M=block_m,
    )
    return out_rows.t


def affine_triton(
    out: Tensor, u: Tensor, p: Tensor, r: Tensor, v: Tensor | None = None, q: Tensor | None = None,
    v_factor: Tensor | None = None,
) -> Tensor:
    """out = u·p[n,c] + r[(n,) c] (+ (v·v_factor[n])·q[n,c]) elementwise over (N, C, *S), into ``out`` in one pass.

    p, q are (N, C), r is (C,) or (N, C) and ``v_factor`` is (N,), all in the compute dtype (r's);
    ``out`` must be dense (e.g. ``torch.empty_like(x)``).
    """
    if (v is None) != (q is None):
        raise ValueError("v and q must be given together")
    if v_factor is not None and v is None:
        raise ValueError("v_factor scales v: give v and q too")
    if r.dim() != 2 and r.numel() != p.shape[1]:
        raise ValueError(f"r must be (C,) or (N, C) for C = {p.shape[1]}; got shape {tuple(r.shape)}")
    with _on_device(out):
        return _affine(_as_rows(out, writable=True), _as_rows(u), p, r, None if v is None else _as_rows(v), q, v_factor)


_ALGEBRA_ROW_BLOCK = 1024  # channels per step of the per-sample kernels
# (samples, channels) per step of the per-channel kernels: few channels a program, so that C = 256 is 16 programs
# and not 4 (the H200 run: 8-12 µs for the forward coefficients of a 128×2048 batch on 32 programs of 64 channels)
_ALGEBRA_TILE = (64, 16)
_ALGEBRA_SPLIT_ROWS = 256  # larger batches: the per-channel reductions split into programs of this many samples


def _splits(n: int) -> int:
    """How many programs share each per-channel reduction over the batch (1: one program does it all)."""
    return _cdiv(n, _ALGEBRA_SPLIT_ROWS) if n > _ALGEBRA_SPLIT_ROWS else 1


def _sample_scales(mean: Tensor, sumsq: Tensor, spatial: int, rescale: bool, l2_eps: float) -> tuple[Tensor, Tensor]:
    """(r_n, ‖x_n‖), float64 (N,) each: ``sample_scales`` in one launch."""
    n, num_channels = mean.shape
    scale, norm = (torch.empty(n, dtype=torch.float64, device=mean.device) for _ in range(2))
    launch(
        _sample_scales_kernel, (n,),
        mean, sumsq, scale, norm, num_channels, spatial, l2_eps,
        RESCALE=rescale, BLOCK_C=min(_next_pow2(num_channels), _ALGEBRA_ROW_BLOCK),
    )
    return scale, norm


def _optional(t: Tensor | None, fallback: Tensor) -> Tensor:
    """A pointer argument for an optional tensor (the kernel does not read it when its flag is off)."""
    return fallback if t is None else t


def _forward_split_parts(mean: Tensor, sumsq: Tensor, scale: Tensor) -> tuple[Tensor, int]:
    """(part, splits): for batches split across programs, ``_forward_partials_kernel``'s (3, splits, C) partials
    of each split (one launch); else (mean, 1), nothing launched."""
    n, num_channels = mean.shape
    splits = _splits(n)
    if splits == 1:
        return mean, 1
    block_n, block_c = _ALGEBRA_TILE
    part = torch.empty(3, splits, num_channels, dtype=torch.float64, device=mean.device)
    launch(
        _forward_partials_kernel, (_cdiv(num_channels, block_c), splits),
        mean, sumsq, scale, part, n, num_channels, _ALGEBRA_SPLIT_ROWS, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return part, splits


def _local_channel_sums(mean: Tensor, sumsq: Tensor, scale: Tensor, spatial: int) -> Tensor:
    """This rank's [N·M, Σz per channel, Σz² per channel] (1 + 2C float64) for the all-reduce of synchronized
    L2BN: one launch, or two for batches split across programs."""
    n, num_channels = mean.shape
    sums = torch.empty(1 + 2 * num_channels, dtype=torch.float64, device=mean.device)
    part, splits = _forward_split_parts(mean, sumsq, scale)
    block_n, block_c = _ALGEBRA_TILE
    launch(
        _local_channel_sums_kernel, (_cdiv(num_channels, block_c),),
        mean, sumsq, scale, part, sums, n, num_channels, spatial, _ALGEBRA_SPLIT_ROWS,
        SPLIT=splits > 1, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return sums


def _forward_coefficients(
    mean: Tensor, sumsq: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, momentum: float, eps: float,
    spatial: int, acc: torch.dtype, sums: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gain, shift, μ, invstd) per channel — y = x·r_n·gain + shift — and, training, the running statistics
    updated in place: one launch, or two for batches split across programs. ``sums``: the statistics come from
    all ranks' :func:`_local_channel_sums`, all-reduced (synchronized L2BN; training only)."""
    n, num_channels = mean.shape
    stats = dict(dtype=torch.float64, device=mean.device)
    gain, mu, invstd = (torch.empty(num_channels, **stats) for _ in range(3))
    shift = torch.empty(num_channels, dtype=acc, device=mean.device)
    block_n, block_c = _ALGEBRA_TILE
    part, splits = _forward_split_parts(mean, sumsq, scale) if training and sums is None else (mean, 1)
    launch(
        _forward_coefficients_kernel, (_cdiv(num_channels, block_c),),
        mean, sumsq, scale, part, _optional(sums, mu), _optional(weight, mu), _optional(bias, mu),
        _optional(running_mean, mu), _optional(running_var, mu), gain, shift, mu, invstd, n, num_channels, spatial,
        _ALGEBRA_SPLIT_ROWS, eps, momentum, TRAINING=training, SPLIT=splits > 1, SUMS_IN=sums is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=running_mean is not None and running_var is not None, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return gain, shift, mu, invstd


def _backward_channel_sums(
    dy_sum: Tensor, dy_xc: Tensor, mean: Tensor, scale: Tensor, mu: Tensor, invstd: Tensor, weight: Tensor | None,
    training: bool, spatial: int, param_dtype: torch.dtype, sums: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """(grad_weight, grad_bias, gain, k, bias_term) per channel: ``input_gradient``'s reductions over the batch,
    in one launch, or two for batches split across programs. ``sums`` ((2, C) float64): Σ dy and Σ dy·ẑ are
    written there too, for synchronized L2BN's all-reduce (then call it with ``training=False``: k and bias_term
    follow from the global sums, :func:`_synced_gradient_coefficients`)."""
    n, num_channels = dy_sum.shape
    stats = dict(dtype=torch.float64, device=dy_sum.device)
    grad_weight, grad_bias = (torch.empty(num_channels, dtype=param_dtype, device=dy_sum.device) for _ in range(2))
    gain, k, bias_term = (torch.empty(num_channels, **stats) for _ in range(3))
    block_n, block_c = _ALGEBRA_TILE
    splits = _splits(n)
    part = dy_sum
    if splits > 1:
        part = torch.empty(2, splits, num_channels, **stats)
        launch(
            _backward_partials_kernel, (_cdiv(num_channels, block_c), splits),
            dy_sum, dy_xc, mean, scale, mu, part, n, num_channels, _ALGEBRA_SPLIT_ROWS,
            BLOCK_N=block_n, BLOCK_C=block_c,
        )
    launch(
        _backward_channel_sums_kernel, (_cdiv(num_channels, block_c),),
        dy_sum, dy_xc, mean, scale, part, mu, invstd, _optional(weight, mu), grad_weight, grad_bias,
        gain, k, bias_term, _optional(sums, mu), n, num_channels, spatial, _ALGEBRA_SPLIT_ROWS,
        TRAINING=training, SPLIT=splits > 1, SUMS_OUT=sums is not None, HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return grad_weight, grad_bias, gain, k, bias_term


def _synced_gradient_coefficients(sums: Tensor, count: Tensor, gain: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """(k, bias_term) per channel from all ranks' Σ dy and Σ dy·ẑ ((2, C) float64) and the global count."""
    num_channels = gain.numel()
    k, bias_term = torch.empty_like(gain), torch.empty_like(gain)
    block_c = min(_next_pow2(num_channels), _ALGEBRA_ROW_BLOCK)
    launch(
        _synced_gradient_coefficients_kernel, (_cdiv(num_channels, block_c),),
        sums, count, gain, invstd, k, bias_term, num_channels, BLOCK_C=block_c,
    )
    return k, bias_term


def _input_gradient(
    dy_rows: _Rows, x_rows: _Rows, dy_sum: Tensor, dy_xc: Tensor, mean: Tensor, sumsq: Tensor, scale: Tensor,
    norm: Tensor, mu: Tensor, gain: Tensor, k: Tensor, bias_term: Tensor, training: bool, l2_eps: float,
) -> Tensor:
    """dx from the per-(n, c) sums and the per-channel terms: ``input_gradient``'s per-sample rest in one launch,
    then one pass over (dy, x)."""
    n, num_channels = dy_sum.shape
    x = x_rows.t
    acc = _ACCUMULATION[x.dtype]
    dy_coef, x_coef, shift = (torch.empty(n, num_channels, dtype=acc, device=x.device) for _ in range(3))
    # 1 but for huge samples, whose x·factor has norm in [0.5, 1): the x-term (x·factor)·(Q/factor) stays in
    # float32's range where Q (~1/‖x_n‖²) itself would underflow
    factor = torch.empty(n, dtype=acc, device=x.device)
    launch(
        _backward_sample_coefficients_kernel, (n,),
        dy_sum, dy_xc, mean, sumsq, scale, norm, mu, gain, k, bias_term, dy_coef, x_coef, shift, factor,
        num_channels, x_rows.m, l2_eps,
        TRAINING=training, BLOCK_C=min(_next_pow2(num_channels), _ALGEBRA_ROW_BLOCK),
    )
    return _affine(_empty_rows_like(x_rows), dy_rows, dy_coef, shift, x_rows, x_coef, factor)


class TritonL2BatchNorm(torch.autograd.Function):
    """L2BN through the Triton kernels, the running statistics updated in place (training)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, rescale, l2_eps):
        acc = _ACCUMULATION[x.dtype]
        rows = _as_rows(x)  # a dense copy only if the spatial dims do not flatten to one stride
        x, spatial = rows.t, rows.m
        with _on_device(x):
            mean, sumsq = _moments(rows)  # one read of x; the norms follow in eval too (float64)
            scale, norm = _sample_scales(mean, sumsq, spatial, rescale, l2_eps)
            gain, shift, mu, invstd = _forward_coefficients(mean, sumsq, scale, weight, bias, running_mean,
                                                            running_var, training, momentum, eps, spatial, acc)
            y = _affine(_empty_rows_like(rows), rows, gain, shift, None, None, None, p_factor=scale)
        # x, the weight and O(N + C) vectors only: backward's read of (dy, x) recomputes the per-(n, c)
        # moments, so no more is kept than BatchNorm keeps.
        ctx.save_for_backward(x, weight, scale, norm, mu, invstd)
        ctx.training, ctx.l2_eps = training, l2_eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, norm, mu, invstd = ctx.saved_tensors
        x_rows, dy_rows = _as_rows(x), _as_rows(dy)
        spatial = x_rows.m
        with _on_device(x):
            mean, sumsq, dy_sum, dy_xc = _gradient_sums(dy_rows, x_rows, None)  # Σ dy, Σ dy·(x − m)
            grad_weight, grad_bias, gain, k, bias_term = _backward_channel_sums(
                dy_sum, dy_xc, mean, scale, mu, invstd, weight, ctx.training, spatial,
                weight.dtype if weight is not None else _ACCUMULATION[x.dtype],
            )
            dx = _input_gradient(dy_rows, x_rows, dy_sum, dy_xc, mean, sumsq, scale, norm, mu, gain, k, bias_term,
                                 ctx.training, ctx.l2_eps)
        return (
            dx,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None,
        )


def _dense_samples(rows: _Rows) -> bool:
    """Whether each sample's C·M values fill one block of memory (NCHW or channels-last rows)."""
    stride_n, stride_c, stride_m = rows.strides
    return stride_n == rows.c * rows.m and (stride_c, stride_m) in ((rows.m, 1), (1, rows.c))


def _inference_applies(rows: _Rows, *tensors: Tensor | None) -> bool:
    """Whether an eval call takes :func:`_inference`: nothing needs a gradient (no_grad, or no tensor that
    requires one), the input is not float64 (whose squares could overflow: it keeps the moments' path) and its
    samples are dense."""
    return _INFERENCE_PATH and not needs_autograd(*tensors) and _scaled(rows.t) and _dense_samples(rows)


def _inference(rows: _Rows, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
               running_var: Tensor, eps: float, rescale: bool, l2_eps: float) -> Tensor:
    """Eval-mode L2BN with nothing to differentiate, in two launches and two allocations: ‖x_n‖² in parts
    (``_sample_squares_kernel``), then the output with r_n and the per-channel coefficients formed in the pass
    (``_inference_output_kernel``); no autograd node, no (N, C) moments."""
    x, n, num_channels = rows.t, rows.n, rows.c
    size = num_channels * rows.m
    parts, span = _parts(n, _cdiv(size, _REDUCE_TILE))
    squares = torch.empty(n, parts, dtype=torch.float64, device=x.device)
    launch(_sample_squares_kernel, (n, parts), x, squares, size, rows.strides[0], span, BLOCK_M=_REDUCE_TILE)
    out_rows = _empty_rows_like(rows)
    out = out_rows.t
    block_c, block_m = _tile(out_rows, _ELEMENTWISE_TILE)
    num_m_blocks = _cdiv(rows.m, block_m)
    launch(
        _inference_output_kernel, (n * num_m_blocks, _cdiv(num_channels, block_c)),
        x, out, squares, _optional(weight, squares), _optional(bias, squares), running_mean, running_var,
        num_channels, rows.m, parts, num_m_blocks, *rows.strides, *out_rows.strides, eps, l2_eps,
        RESCALE=rescale, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c,
        BLOCK_M=block_m, BLOCK_P=_MERGE_TILE[0],
    )
    return out


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
    if not training and running_mean is not None and running_var is not None:
        rows = _as_rows(input)
        if _inference_applies(rows, input, weight, bias):
            with _on_device(input):
                return _inference(rows, weight, bias, running_mean, running_var, eps, rescale, l2_eps)
    return TritonL2BatchNorm.apply(input, weight, bias, running_mean, running_var, training, momentum, eps, rescale,
                                   l2_eps)


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
