"""Functional L2BN, mirroring ``torch.nn.functional.batch_norm``.

L2BN (Wang et al., eq. 3): every sample's whole feature x_n (all C·|S| values) is scaled to norm
sqrt(D), x̂_n = sqrt(D)·x_n / max(‖x_n‖₂, ε_l2), and ordinary batch normalization follows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels.dispatch import (  # noqa: F401  (the switch's public names, re-exported here)
    IMPL_ENV_VAR,
    IMPLEMENTATIONS,
    TRITON_DEVICE_TYPES,
    aten_tracer,
    auto_impl,
    impl_name,
    resolve_impl,
)


HALF_TYPES = (torch.float16, torch.bfloat16)


def check_l2_eps(l2_eps: float) -> float:
    """``l2_eps`` itself when it is a finite number ≥ 0 (the lower bound on a sample's norm); else ValueError."""
    if not (isinstance(l2_eps, (int, float)) and 0.0 <= l2_eps < math.inf):  # False for NaN
        raise ValueError(f"l2_eps must be a finite number >= 0 (a lower bound on each sample's norm), got {l2_eps!r}")
    return l2_eps


def _check_channel_tensors(num_channels: int, dtype: torch.dtype, *tensors: Tensor | None) -> None:
    """Each of running_mean, running_var, weight, bias (None: absent) holds one value a channel, in ``dtype`` or
    in float32 with float16/bfloat16 input."""
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), tensors):
        if t is None:
            continue
        if t.numel() != num_channels:
            raise RuntimeError(f"{name} should contain {num_channels} elements not {t.numel()}")
        if t.dtype != dtype and not (dtype in HALF_TYPES and t.dtype == torch.float32):
            raise RuntimeError(
                f"mixed dtype: input is {dtype} but {name} is {t.dtype}; like BatchNorm, L2BN takes "
                f"parameters and buffers of the input's dtype (or float32 ones with float16/bfloat16 input): "
                f"convert the module (module.to({dtype})) or the input"
            )


def _check_inputs(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {input.dim()}D input of shape {tuple(input.shape)}")
    num_channels = input.shape[1]
    dtype = input.dtype
    for t in (running_mean, running_var, weight, bias):  # the usual case in one test each (per-call cost)
        if t is not None and (t.numel() != num_channels or t.dtype != dtype):
            _check_channel_tensors(num_channels, dtype, running_mean, running_var, weight, bias)
            break
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if training:
        values_per_channel = input.numel() // num_channels if num_channels else 0
        if values_per_channel == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
    elif running_mean is None:
        raise ValueError("running_mean and running_var must be defined in evaluation mode (training=False)")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def l2_batch_norm(
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
    impl: str | None = None,
) -> Tensor:
    """L2BN of ``input``: each sample scaled to norm sqrt(D) (if ``rescale``), then batch normalization.

    Arguments and the in-place running-statistics update follow ``torch.nn.functional.batch_norm``.

    Args:
        rescale: multiply the unit-norm sample by sqrt(D), D = C·|S| (the paper's eq. 3); ``False`` gives
            plain l2 normalisation.
        l2_eps: lower bound on a sample's norm (an all-zero sample stays zero).
        impl: ``"cpp"``, ``"fused"``, ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$L2BN_IMPL``,
            else ``"auto"``): Triton for CUDA tensors when triton is installed, the compiled kernel for CPU
            tensors (where it builds), else ``"fused"``. Empty inputs, ``torch.export``, ``torch.jit.trace``
            (and the legacy ONNX exporter), ``torch.fx`` and ``torch.func`` always take ``"reference"``.

    Shape:
        input (N, C, *), output the same shape; the other tensors (C,).

    Example::

        >>> x = torch.randn(4, 3, 5, 5)
        >>> y = l2_batch_norm(x, None, None, training=True)
        >>> y.shape
        torch.Size([4, 3, 5, 5])
        >>> abs(y.mean().item()) < 1e-6, round(y.var(unbiased=False).item(), 3)  # BatchNorm's standardisation
        (True, 1.0)
    """
    _check_inputs(input, running_mean, running_var, weight, bias, training, eps)
    check_l2_eps(l2_eps)
    fn = resolve_impl(impl, input, weight, bias)
    return fn(
        input, running_mean, running_var, weight, bias, training, momentum, eps, rescale=rescale, l2_eps=l2_eps
    )


torch.fx.wrap("l2_batch_norm")  # fx symbolic tracing records calls through this module as one node
