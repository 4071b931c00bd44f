"""The implementation switch: which L2BN path runs for a given input, argument and environment.

``auto`` takes the Triton kernels for CUDA tensors (when triton is installed), the compiled kernel for CPU
tensors (when it builds), else the torch-op fused path. Two situations override every choice:

- **an empty input** runs the reference composition (nothing to fuse; BatchNorm's own empty handling);
- **a graph tracer whose artifact must be plain, differentiable aten ops** — ``torch.export`` (the
  exported module is trained with autograd, and saved programs must load without l2bn),
  ``torch.jit.trace`` (also the legacy ``torch.onnx.export(dynamo=False)``), ``torch.fx`` symbolic
  tracing and the ``torch.func`` transforms — runs the reference composition, which keeps D = C·|S|
  symbolic. ``torch.compile`` is not one of them: it traces the fused path's autograd.Function.

Where gradients are wanted, the compiled CPU kernel runs inside :class:`_CompiledKernel`, whose backward is
the kernel's own unless the incoming gradient is vmap-batched (``torch.autograd.grad(...,
is_grads_batched=True)``, gradcheck's ``check_batched_grad``): the kernel reads raw memory and cannot take
a batched tensor, so that backward differentiates the reference composition instead.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor

from torch.autograd.function import FunctionCtx

from . import cpp
from .fused import is_batched, l2_batch_norm_fused
from .overflow import rerun_rescaled_on_overflow
from .reference import l2_batch_norm_reference

IMPL_ENV_VAR = "L2BN_IMPL"
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # device types ``auto`` sends to the Triton kernels


def _l2_batch_norm_triton(*args, **kwargs) -> Tensor:
    """:func:`l2bn.kernels.triton_l2bn.l2_batch_norm_triton`, imported on first use (Triton decorates its
    kernels at import, reading ``TRITON_INTERPRET`` then; importing l2bn should not pay for it)."""
    from .triton_l2bn import l2_batch_norm_triton

    return l2_batch_norm_triton(*args, **kwargs)


_compiled_once = cpp.l2_batch_norm_cpp.__wrapped__  # no rerun inside: it rescales outside, where autograd sees it


def _keep_graph() -> bool:
    """Whether the running backward keeps its graph (``retain_graph``): the inner kernel graph follows it, so its
    saved tensors are freed exactly when the kernel's own would be (torch's AOT autograd asks the same)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def _leaves(tensors: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors)


class _CompiledKernel(torch.autograd.Function):
    """The compiled kernel (its forward and backward), with the reference's backward for batched gradients."""

    @staticmethod
    def forward(ctx: FunctionCtx, input, weight, bias, running_mean, running_var, training, momentum, eps, rescale,
                l2_eps):
        leaves = _leaves((input, weight, bias))
        with torch.enable_grad():  # the kernel's own autograd node, run by backward
            y = _compiled_once(leaves[0], running_mean, running_var, *leaves[1:], training, momentum, eps,
                                      rescale=rescale, l2_eps=l2_eps)
        ctx.graph = (y, leaves)  # not save_for_backward: in-place ops on the output (ReLU) are fine, as for the kernel
        ctx.stats = (None, None) if training else (running_mean, running_var)
        ctx.options = (training, eps, rescale, l2_eps)
        return y.detach()

    @staticmethod
    def backward(ctx, dy: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("l2bn: the compiled CPU kernel has no double backward; use impl='reference'")
        if ctx.graph is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (l2bn's compiled kernel freed its saved tensors); "
                "specify retain_graph=True the first time"
            )
        y, leaves = ctx.graph
        keep_graph = _keep_graph()
        if not keep_graph:
            ctx.graph = None
        if is_batched(dy):  # vmap over backward: differentiate the torch-op reference instead
            training, eps, rescale, l2_eps = ctx.options
            leaves = _leaves(leaves)
            with torch.enable_grad():
                y = l2_batch_norm_reference(leaves[0], *ctx.stats, *leaves[1:], training, 0.0, eps, rescale=rescale,
                                            l2_eps=l2_eps)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, dy))
            return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves), *[None] * 7)
        if y.grad_fn is None:  # nothing needed a gradient
            return (None,) * 10
        # the node's gradients follow its defined tensor inputs: input, weight, bias come first
        grads = y.grad_fn(dy)
        grads = iter(grads if isinstance(grads, tuple) else (grads,))
        return (*(None if t is None else next(grads) for t in leaves), *[None] * 7)


@rerun_rescaled_on_overflow
def l2_batch_norm_compiled(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                           eps=1e-5, *, rescale=True, l2_eps=1e-12) -> Tensor:
    """The compiled CPU kernel; where gradients are wanted, inside :class:`_CompiledKernel` (batched gradients)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if not needs_grad:
        return _compiled_once(input, running_mean, running_var, weight, bias, training, momentum, eps,
                              rescale=rescale, l2_eps=l2_eps)
    return _CompiledKernel.apply(input, weight, bias, running_mean, running_var, training, momentum, eps, rescale,
                                 l2_eps)


IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "cpp": l2_batch_norm_compiled,
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
    """``auto`` uses the compiled kernel for CPU tensors outside torch.compile (which traces the torch-op
    fused path instead), when it builds; if it does not, it warns once and takes the fused path."""
    if input.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if cpp.available():
        return True
    cpp.warn_unavailable()
    return False


def aten_tracer(input: Tensor) -> str | None:
    """The name of the active tracer that needs the reference composition (see the module docstring), or None."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if torch.compiler.is_exporting():
        return "torch.export"
    if torch.compiler.is_compiling():  # torch.compile traces the fused path (and handles torch.func itself)
        return None
    if isinstance(input, torch.fx.Proxy):
        return "torch.fx"
    if torch._C._functorch.is_functorch_wrapped_tensor(input):
        return "torch.func"
    return None


def auto_impl(input: Tensor) -> str:
    """The implementation ``auto`` picks for ``input``."""
    if prefers_triton(input):
        return "triton"
    return "cpp" if prefers_cpp(input) else "fused"


def impl_setting() -> str:
    """The implementation chosen from the environment: ``$L2BN_IMPL`` as set (unset or empty: ``"auto"``)."""
    return os.environ.get(IMPL_ENV_VAR) or "auto"


def impl_name(impl: str | None, input: Tensor) -> str:
    """The implementation that runs: the reference for empty inputs and under aten tracers, else the
    ``impl`` argument, else ``$L2BN_IMPL``, else the fastest for ``input`` (``auto``)."""
    name = (impl if impl is not None else impl_setting()).lower()
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown L2BN implementation {name!r}; expected one of {['auto', *IMPLEMENTATIONS]}")
    if aten_tracer(input) is not None or input.numel() == 0:
        return "reference"
    return auto_impl(input) if name == "auto" else name


def resolve_impl(impl: str | None, input: Tensor) -> Callable[..., Tensor]:
    """The function :func:`impl_name` names."""
    return IMPLEMENTATIONS[impl_name(impl, input)]
