"""Reference L2BN: the literal composition of the paper's eq. (3) and torch's batch norm.

Slow (it materialises the normalised tensor and autograd saves it), but obviously right; every
fused path is tested against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .algebra import nan_as_inf


def sample_norms(input: Tensor) -> Tensor:
    """‖x_n‖ (shape (N, 1, ..., 1)): accumulated in float64 for float32 and 16-bit input, where no finite
    value's square overflows, in float64 for float64 input (which overflows only beyond ~1e154)."""
    dims = tuple(range(1, input.dim()))
    return torch.linalg.vector_norm(input, dim=dims, keepdim=True, dtype=torch.float64)


def l2_normalize_samples(input: Tensor, *, rescale: bool = True, l2_eps: float = 1e-12) -> Tensor:
    """Divide each sample's whole feature (all non-batch dims) by its l2 norm, times sqrt(D) if ``rescale``.

    The norm is accumulated and divided by sqrt(D) in float64, so no float32 or 16-bit input overflows it
    (values near 3e38 included), and the division happens in at least float32; a sample holding inf or NaN counts as
    infinitely long (scaled to zero), so only that value's channel turns NaN downstream.
    """
    acc_dtype = torch.promote_types(input.dtype, torch.float32)
    norm = nan_as_inf(sample_norms(input)).clamp_min(l2_eps)
    if rescale:  # D from the shape: symbolic under torch.export, a traced value under torch.jit.trace
        norm = norm / math.prod(input.shape[1:]) ** 0.5
    # ‖x_n‖/sqrt(D) ≤ max |x_n| fits the input's type, where ‖x_n‖ itself may not (values near 3e38)
    return (input.to(acc_dtype) / norm.to(acc_dtype)).to(input.dtype)


def l2_batch_norm_reference(
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
    """l2-normalise each sample, then ``F.batch_norm`` (updates the running statistics in place)."""
    normalized = l2_normalize_samples(input, rescale=rescale, l2_eps=l2_eps)
    return F.batch_norm(normalized, running_mean, running_var, weight, bias, training, momentum, eps)
