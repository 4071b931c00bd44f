"""The implementation switch: which L2BN path runs for a given input, argument and environment.

``auto`` takes the Triton kernels for CUDA tensors (when triton is installed), the compiled kernel for CPU
tensors (when it builds), else the torch-op fused path. Two situations override every choice:

- **an empty input** runs the reference composition (nothing to fuse; BatchNorm's own empty handling);
- **a graph tracer whose artifact must be plain, differentiable aten ops** — ``torch.export`` (the
  exported module is trained with autograd, and saved programs must load without l2bn),
  ``torch.jit.trace`` (also the legacy ``torch.onnx.export(dynamo=False)``), ``torch.fx`` symbolic
  tracing, the ``torch.func`` transforms and ``torch.autograd.forward_ad`` duals, of the input or of the
  weight and bias (the fast paths have no jvp) — runs the reference composition, which keeps D = C·|S|
  symbolic. ``torch.compile`` is not one of them: on the CPU its graphs call the compiled kernel through custom
  operators (``kernels/cpp_custom_op.py``; the torch-op fused path where the kernel does not build, and for the
  inference of small inputs), on other devices it traces the fused path's autograd.Function, which the compiler
  fuses.

The compiled CPU kernel's autograd node is its own (C++): it computes batched gradients
(``torch.autograd.grad(..., is_grads_batched=True)``, gradcheck's ``check_batched_grad``) through ATen ops,
so no Python wrapper costs anything per call.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import cpp
from .cpp_custom_op import l2_batch_norm_cpp_graph
from .fused import l2_batch_norm_fused
from .reference import l2_batch_norm_reference

IMPL_ENV_VAR = "L2BN_IMPL"
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # device types ``auto`` sends to the Triton kernels


def _l2_batch_norm_triton(*args, **kwargs) -> Tensor:
    """:func:`l2bn.kernels.triton_l2bn.l2_batch_norm_triton`, imported on first use (Triton decorates its
    kernels at import, reading ``TRITON_INTERPRET`` then; importing l2bn should not pay for it)."""
    from .triton_l2bn import l2_batch_norm_triton

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
    """``auto`` uses the Triton kernels for tensors on ``TRITON_DEVICE_TYPES`` when triton is installed, outside
    torch.compile (which traces the torch-op path and generates its own fused kernels from it)."""
    return _device_type(input) in TRITON_DEVICE_TYPES and triton_importable() and not torch.compiler.is_compiling()


def _device_type(input: Tensor) -> str:
    """``input.device.type``, without building a device object for CPU tensors (it costs per layer call)."""
    return "cpu" if input.is_cpu else input.device.type


def prefers_cpp(input: Tensor) -> bool:
    """``auto`` uses the compiled kernel for CPU tensors (under torch.compile through its custom operators),
    when it builds; if it does not, it warns once and takes the fused path."""
    if not input.is_cpu:
        return False
    if cpp.available():
        return True
    if not torch.compiler.is_compiling():  # (a traced graph would break at the warning)
        cpp.warn_unavailable()
    return False


def aten_tracer(input: Tensor, *params: Tensor | None) -> str | None:
    """The name of the active tracer that needs the reference composition (see the module docstring), or None."""
    if torch._C._get_tracing_state() is not None:  # torch.jit.is_tracing() outside TorchScript
        return "torch.jit.trace"
    if torch.compiler.is_exporting():
        return "torch.export"
    if torch.compiler.is_compiling():  # graphs hold the kernels or the fused path (torch.func is its own)
        return None
    if isinstance(input, torch.fx.Proxy):
        return "torch.fx"
    if torch._C._are_functorch_transforms_active():  # (one call; checking every tensor costs ~1.5 µs a layer)
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if wrapped(input) or any(t is not None and wrapped(t) for t in params):  # a transform over input or weights
            return "torch.func"
    if forward_ad._current_level >= 0 and any(  # torch.autograd.forward_ad duals: the fast paths have no jvp
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in (input, *params)):
        return "forward-mode AD"
    return None


def auto_impl(input: Tensor) -> str:
    """The implementation ``auto`` picks for ``input``."""
    if prefers_triton(input):
        return "triton"
    return "cpp" if prefers_cpp(input) else "fused"


# os.environ's own store and key encoding (CPython's ``os._Environ``): ``os.environ.get`` of an unset variable
# raises and catches two KeyErrors, ~6 µs inside a training step (cold code), where the dict lookup costs ~0.5.
_ENVIRON_STORE = getattr(os.environ, "_data", None)
_ENVIRON_KEY = os.environ.encodekey(IMPL_ENV_VAR) if hasattr(os.environ, "encodekey") else None


def impl_setting() -> str:
    """The implementation chosen from the environment: ``$L2BN_IMPL`` as set (unset or empty: ``"auto"``), read
    on every call (``os.environ`` changes, as tests and notebooks make them, take effect at once)."""
    if _ENVIRON_STORE is None or _ENVIRON_KEY is None:
        return os.environ.get(IMPL_ENV_VAR) or "auto"
    value = _ENVIRON_STORE.get(_ENVIRON_KEY)
    return os.environ.decodevalue(value) if value else "auto"


def requested_impl(impl: str | None) -> str:
    """The implementation asked for: the ``impl`` argument, else ``$L2BN_IMPL``, else ``"auto"`` (lower case,
    checked against ``IMPLEMENTATIONS``)."""
    name = (impl if impl is not None else impl_setting()).lower()
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown L2BN implementation {name!r}; expected one of {['auto', *IMPLEMENTATIONS]}")
    return name


def impl_name(impl: str | None, input: Tensor, *params: Tensor | None) -> str:
    """The implementation that runs: the reference for empty inputs and under aten tracers (forward-mode AD:
    a dual ``input`` or ``params``, the weight and bias), else the ``impl`` argument, else ``$L2BN_IMPL``, else
    the fastest for ``input`` (``auto``)."""
    name = requested_impl(impl)
    if aten_tracer(input, *params) is not None or input.numel() == 0:
        return "reference"
    return auto_impl(input) if name == "auto" else name


def resolve_impl(impl: str | None, input: Tensor, *params: Tensor | None) -> Callable[..., Tensor]:
    """The function :func:`impl_name` names (for ``cpp`` under torch.compile: the kernel's custom operators,
    which a graph can hold)."""
    name = impl_name(impl, input, *params)
    if name == "cpp" and torch.compiler.is_compiling():
        return l2_batch_norm_cpp_graph
    return IMPLEMENTATIONS[name]
