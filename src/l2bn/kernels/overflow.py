"""Huge inputs on the CPU fast paths: a sample whose sum of squares overflows is rerun rescaled by a power of two.

The fast paths accumulate per-(n, c) sums in float32 for float32 and 16-bit input, so a finite sample with
values beyond ~1e19 has an infinite sum of squares. L2BN is invariant to a positive scale of each sample
(x̂_n = k·x_n / ‖x_n‖ above the ε_l2 floor), so such a sample gives the same output once multiplied by an
exact power of two 2^-e that brings max |x_n| into [2^15, 2^16); its input gradient is the rescaled input's
gradient times 2^-e, which autograd applies through the multiplication. Each path detects the case from its
O(N·C) statistics — a non-finite norm of a finite sample — before writing anything (output or running
statistics) and raises :class:`SampleOverflow`; :func:`rerun_rescaled_on_overflow` then reruns it on the
rescaled input. The usual case pays one check of N norms. Samples holding inf or NaN are left as they are
(their channel turns NaN, as in BatchNorm). The compiled kernel's graph operators (what torch.compile's CPU graphs
call, kernels/cpp_custom_op.py) rerun inside C++, with these factors computed by the same ATen operations. Where
no host check can run — the torch-op path under torch.compile, accelerators — the paths keep their statistics in
range instead (float64 sums, or the Triton kernels' per-chunk scaling).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

MESSAGE = "l2bn: a finite sample's sum of squares overflows"  # also raised by csrc/l2bn_cpu.cpp
_RESCALE_FROM = 2.0**32  # samples with max |x| below this cannot overflow a float32 sum of squares
_RESCALE_TO_EXPONENT = 16  # rescaled samples have max |x| in [2^15, 2^16)


class SampleOverflow(RuntimeError):
    """A finite sample's norm overflowed the accumulation type (caught by :func:`rerun_rescaled_on_overflow`)."""


def check_sample_norms(x: Tensor, norm: Tensor) -> None:
    """Raise :class:`SampleOverflow` if a sample of ``x`` (N, C, *S) is finite but its norm (N,) is not.

    Skipped while torch.compile traces (the check is data-dependent), for meta tensors (no data) and on
    accelerators (reading the result on the host would synchronise every layer call with the device); there
    the statistics stay in range by themselves (docs/algorithm.md). The second, rare check reads only the
    samples whose norm is not finite.
    """
    if torch.compiler.is_compiling() or norm.device.type != "cpu":
        return
    finite_norm = torch.isfinite(norm)
    if bool(finite_norm.all()):
        return
    suspects = x.detach()[~finite_norm.to(x.device)]
    if bool(torch.isfinite(suspects).flatten(1).all(dim=1).any()):
        raise SampleOverflow(MESSAGE)


def huge_sample_factors(magnitude: Tensor, to_exponent: int) -> Tensor:
    """Per sample, 1 where ``magnitude`` (N,) is below 2^32 or not finite; else the power of two that brings it
    into [2^(to_exponent − 1), 2^to_exponent) — an exact factor, which no sample below 2^32 ever gets."""
    exponent = torch.frexp(magnitude).exponent  # magnitude = mantissa·2^exponent, mantissa in [0.5, 1)
    huge = torch.isfinite(magnitude) & (magnitude >= _RESCALE_FROM)
    one = torch.ones_like(magnitude)
    return torch.where(huge, torch.ldexp(one, to_exponent - exponent), one)


def huge_sample_scale(x: Tensor) -> Tensor:
    """Per sample of x (N, C, *S), broadcastable to x and of its dtype: the power of two that brings max |x_n|
    into [2^15, 2^16) for finite samples of max |x_n| ≥ 2^32, else 1."""
    with torch.no_grad():
        acc = torch.promote_types(x.dtype, torch.float32)
        amax = torch.amax(x.detach().abs(), dim=tuple(range(1, x.dim()))).to(acc)
        factor = huge_sample_factors(amax, _RESCALE_TO_EXPONENT)
    return factor.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))


def is_sample_overflow(error: BaseException) -> bool:
    """Whether ``error`` is a path's overflow signal (Python's :class:`SampleOverflow` or the C++ kernel's)."""
    return isinstance(error, SampleOverflow) or (isinstance(error, RuntimeError) and MESSAGE in str(error))


def rerun_rescaled_on_overflow(path: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap an L2BN path ``path(input, *args, **kwargs)``: on a sample overflow, run it again on ``input·s`` with
    s = :func:`huge_sample_scale` (input), exact powers of two (the rescaled input cannot overflow, so that run is
    final). With ``input`` requiring a gradient, autograd carries s into it through the multiplication."""

    @functools.wraps(path)
    def run(input: Tensor, *args, **kwargs) -> Tensor:
        if torch.compiler.is_compiling():
            return path(input, *args, **kwargs)
        try:
            return path(input, *args, **kwargs)
        except RuntimeError as error:
            if not is_sample_overflow(error):
                raise
        return path(input * huge_sample_scale(input), *args, **kwargs)

    return run
