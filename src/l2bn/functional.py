"""Functional L2BN, mirroring ``torch.nn.functional.batch_norm``.

L2BN (Wang et al., eq. 3): every sample's whole feature x_n (all C·|S| values) is scaled to norm
sqrt(D), x̂_n = sqrt(D)·x_n / max(‖x_n‖₂, ε_l2), and ordinary batch normalization follows.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor

from .kernels import cpp, l2_batch_norm_fused, l2_batch_norm_reference

IMPL_ENV_VAR = "L2BN_IMPL"
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # device types ``auto`` sends to the Triton kernels


def _l2_batch_norm_triton(*args, **kwargs) -> Tensor:
    """:func:`l2bn.kernels.triton_l2bn.l2_batch_norm_triton`, imported on first use (Triton decorates its
    kernels at import, reading ``TRITON_INTERPRET`` then; importing l2bn should not pay for it)."""
    from .kernels.triton_l2bn import l2_batch_norm_triton

    return l2_batch_norm_triton(*args, **kwargs)


IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "cpp": cpp.l2_batch_norm_cpp,
    "fused": l2_batch_norm_fused,
    "reference": l2_batch_norm_reference,
    "triton": _l2_batch_norm_triton,
}


@functools.cache
def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def prefers_triton(input: Tensor) -> bool:
    """``auto`` uses the Triton kernels for tensors on ``TRITON_DEVICE_TYPES`` when triton is installed."""
    return input.device.type in TRITON_DEVICE_TYPES and triton_importable()


def prefers_cpp(input: Tensor) -> bool:
    """``auto`` uses the compiled kernel for CPU tensors outside torch.compile/export tracing (which trace the
    torch-op fused path instead), when it builds; if it does not, it warns once and takes the fused path."""
    if input.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if cpp.available():
        return True
    cpp.warn_unavailable()
    return False


def auto_impl(input: Tensor) -> str:
    """The implementation ``auto`` picks for ``input``."""
    if input.numel() == 0:
        return "reference"
    if prefers_triton(input):
        return "triton"
    return "cpp" if prefers_cpp(input) else "fused"


def impl_name(impl: str | None, input: Tensor) -> str:
    """The implementation's name: the ``impl`` argument, else ``$L2BN_IMPL``, else the fastest for ``input``."""
    name = impl if impl is not None else os.environ.get(IMPL_ENV_VAR, "auto")
    name = name.lower()
    if name == "auto":
        name = auto_impl(input)
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown L2BN implementation {name!r}; expected one of {['auto', *IMPLEMENTATIONS]}"
        )
    return name


def resolve_impl(impl: str | None, input: Tensor) -> Callable[..., Tensor]:
    """Pick an implementation: the ``impl`` argument, else ``$L2BN_IMPL``, else the fastest for ``input``."""
    return IMPLEMENTATIONS[impl_name(impl, input)]


def _check_inputs(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {input.dim()}D input of shape {tuple(input.shape)}")
    num_channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != num_channels:
            raise RuntimeError(f"{name} should contain {num_channels} elements not {t.numel()}")
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
    """L2BN of ``input`` (N, C, *): per-sample l2 normalisation to norm sqrt(D) (if ``rescale``), then BN.

    Arguments and the in-place running-statistics update follow ``torch.nn.functional.batch_norm``.
    ``impl`` forces ``"cpp"``, ``"fused"``, ``"triton"`` or ``"reference"`` (also settable with the ``L2BN_IMPL``
    environment variable); ``"auto"`` takes Triton for CUDA tensors when triton is installed, the compiled
    kernel for CPU tensors (``"fused"`` while torch.compile traces, or where the kernel cannot be built), else
    ``"fused"``.
    """
    _check_inputs(input, running_mean, running_var, weight, bias, training)
    fn = resolve_impl(impl, input)
    return fn(
        input, running_mean, running_var, weight, bias, training, momentum, eps, rescale=rescale, l2_eps=l2_eps
    )
