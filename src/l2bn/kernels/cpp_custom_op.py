"""The compiled CPU kernel as custom operators that ``torch.compile`` keeps in its graphs.

Eager calls reach the kernel through its own operator, whose autograd node is C++ (no Python a call). That
operator cannot be traced — its C++ runs on real data — so ``torch.compile`` used to trace the torch-op fused
path instead, which Inductor fuses but which ran slower than the kernel (ResNet-20 SGD steps, NCHW, 2-core CPU:
compiled L2BN 1.16× compiled BatchNorm; docs/performance.md, "Session 22"). Here the kernel's passes are
``torch.library`` custom operators with fake implementations (shapes and layouts only), so a compiled graph calls
them as opaque kernels and compiles everything around them:

- ``l2bn::cpu_output_coefficients`` → (A (N, C), S (C,), scale, running mean, running variance): the forward's
  statistics pass alone (in eval the sample norms, the channel statistics being the running ones);
  :class:`_CoefficientForward` writes y = x·A + S in torch ops, which Inductor fuses with the ops after the layer
  (ReLU, a residual addition, a max-pool: one pass over the output where the whole forward operator and a ReLU
  made two). y is within a rounding of the kernel's (it fuses the multiply and add);
- ``l2bn::cpu_forward`` → (y, scale, running mean, running variance): the whole forward, under torch.func
  transforms (torch.compile's copy of an autograd.Function has no vmap rule);
- ``l2bn::cpu_backward`` → (dx, dweight, dbias) from (dy, x·scale), dx times scale (the chain rule of the
  rescaling), the backward of both forwards.

``scale`` holds the per-sample powers of two the input was multiplied by — ones, but for finite samples whose sum
of squares overflows, which the kernel refuses and which run again rescaled (kernels/overflow.py; L2BN is invariant
to a positive scale of a sample). The running statistics are returned updated and :func:`l2_batch_norm_cpp_graph`
copies them into the buffers (an operator with an autograd formula must not write its inputs).

Layouts. The kernel reads NCHW and channels-last tensors alike (others it copies dense), and the fake
implementations give each input's output layout. By default Inductor pins a custom operator's inputs to the strides
seen while tracing; on the CPU it turns convolutions' outputs channels-last, so an NCHW model paid a transposing
copy into the forward operator and another out of it (compiled ResNet-20 NCHW steps 1.08–1.15× compiled
BatchNorm with the copies; docs/performance.md, "Session 23"). The forward operators are therefore tagged
``flexible_layout`` (Inductor hands them x as it is). The backward one reads (dy, x) together, and the kernel
copies dy into x's layout where they differ: tagged ``needs_fixed_stride_order``, Inductor writes dy in the
stride order of the traced graph, which its layout optimisation gives the saved x as well (flexible, a max-pool's
backward left dy NCHW beside a channels-last x: a copy of 32 MiB a step at VGG-16's first stage).

Like the eager operator, no double backward. Under ``torch.func.vmap`` inside a compiled function the operators run
through functorch's per-sample fallback (correct, with torch's performance warning; they have no batching rule).
Such compiles graph-break (vmap at the module's repr, vmap of grad where the operator's autograd meets functorch
under fake tensors) and run those parts eagerly; Dynamo then skips the frames it failed on, so a later
``torch.compile(..., fullgraph=True)`` of an L2BN model in the same process fails until ``torch._dynamo.reset()``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cpp import check_on_cpu, operators
from .fused import per_channel
from .overflow import call_rescaled_on_overflow


_ANY_LAYOUT = (torch.Tag.flexible_layout,)  # the layout constraints Inductor applies (module docstring)
_GRADIENT_IN_ORDER = (torch.Tag.needs_fixed_stride_order,)


def _output_like(input: Tensor) -> Tensor:
    """An empty tensor in the layout the kernel gives its outputs: channels-last where ``input`` is channels-last
    (and not also contiguous), else contiguous (the kernel's ``dense``)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if fmt is not None and not input.is_contiguous() and input.is_contiguous(memory_format=fmt):
        return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _scale_dtype(input: Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, torch.float32)


def _updates(training: bool, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    return training and running_mean is not None and running_var is not None


def _call_functionally(kernel, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, updates: bool, *args):
    """(out, scale (N,), new running mean, new running variance) of ``kernel(input, weight, bias, running_mean,
    running_var, *args)``, or of ``input·scale`` where a sample overflowed; the running statistics are updated in
    copies that are returned (empty (0,) tensors unless ``updates``), not written: an autograd formula needs a
    functional operator."""
    new_mean, new_var = (running_mean.clone(), running_var.clone()) if updates else (None, None)
    mean_in, var_in = (new_mean, new_var) if updates else (running_mean, running_var)
    with torch.no_grad():  # a refused call wrote nothing: the rerun starts from the same statistics
        out, factor = call_rescaled_on_overflow(kernel, input, weight, bias, mean_in, var_in, *args)
    dtype = _scale_dtype(input)
    scale = torch.ones(input.shape[0], dtype=dtype) if factor is None else factor.reshape(-1).to(dtype)
    if not updates:  # two tensors: the returns may not alias each other
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    return out, scale, new_mean, new_var


def _fake_statistics(input: Tensor, updates: bool, running_mean: Tensor | None, running_var: Tensor | None
                     ) -> tuple[Tensor, Tensor]:
    """The running statistics :func:`_call_functionally` returns, for the fake implementations."""
    if updates:
        return torch.empty_like(running_mean), torch.empty_like(running_var)
    return input.new_empty(0), input.new_empty(0)


@torch.library.custom_op("l2bn::cpu_forward", mutates_args=(), device_types="cpu", tags=_ANY_LAYOUT)
def cpu_forward(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, training: bool, momentum: float, eps: float, l2_eps: float,
                rescale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, scale (N,), new running mean, new running variance): the kernel's forward (:func:`_call_functionally`)."""
    return _call_functionally(operators().l2_batch_norm.default, input, weight, bias, running_mean, running_var,
                              _updates(training, running_mean, running_var), training, momentum, eps, l2_eps, rescale)


@cpu_forward.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
    new_mean, new_var = _fake_statistics(input, _updates(training, running_mean, running_var), running_mean, running_var)
    return _output_like(input), input.new_empty(input.shape[0], dtype=_scale_dtype(input)), new_mean, new_var


@torch.library.custom_op("l2bn::cpu_output_coefficients", mutates_args=(), device_types="cpu", tags=_ANY_LAYOUT)
def cpu_output_coefficients(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                            running_var: Tensor | None, training: bool, momentum: float, eps: float, l2_eps: float,
                            rescale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(A (N, C), S (C,), scale (N,), new running mean, new running variance) of a forward whose output
    y = x·A[n, c] + S[c] the caller writes (:class:`_CoefficientForward`): the kernel's statistics pass alone (in
    eval, the sample norms). A carries the overflow factors (x·(s·A) = (x·s)·A, s exact powers of two)."""
    (a, shift), scale, new_mean, new_var = _call_functionally(
        operators().l2_batch_norm_coefficients.default, input, weight, bias, running_mean, running_var,
        _updates(training, running_mean, running_var), training, momentum, eps, l2_eps, rescale)
    return a * scale[:, None], shift, scale, new_mean, new_var


@cpu_output_coefficients.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
    (n, c), dtype = input.shape[:2], _scale_dtype(input)
    new_mean, new_var = _fake_statistics(input, _updates(training, running_mean, running_var), running_mean,
                                         running_var)
    return (input.new_empty((n, c), dtype=dtype), input.new_empty(c, dtype=dtype), input.new_empty(n, dtype=dtype),
            new_mean, new_var)


@torch.library.custom_op("l2bn::cpu_backward", mutates_args=(), device_types="cpu", tags=_GRADIENT_IN_ORDER)
def cpu_backward(grad_out: Tensor, input: Tensor, scale: Tensor, weight: Tensor | None, running_mean: Tensor | None,
                 running_var: Tensor | None, training: bool, eps: float, l2_eps: float, rescale: bool,
                 has_bias: bool, bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of :func:`cpu_forward`; the parameter gradients are empty (0,) tensors where the layer
    has no weight or no bias (``has_bias``; ``bias_dtype``: its gradient's dtype)."""
    rescaled = bool((scale != 1).any())
    view = scale.to(input.dtype).view((-1,) + (1,) * (input.dim() - 1))
    dx, dweight, dbias = operators().l2_batch_norm_backward.default(
        grad_out, input * view if rescaled else input, weight, running_mean, running_var, training, eps, l2_eps,
        rescale, bias_dtype if has_bias else None)
    return (dx * view if rescaled else dx, input.new_empty(0) if dweight is None else dweight,
            input.new_empty(0) if dbias is None else dbias)


@cpu_backward.register_fake
def _(grad_out, input, scale, weight, running_mean, running_var, training, eps, l2_eps, rescale, has_bias,
      bias_dtype):
    channels = input.shape[1]
    dweight = input.new_empty(channels, dtype=weight.dtype) if weight is not None else input.new_empty(0)
    dbias = input.new_empty(channels, dtype=bias_dtype) if has_bias else input.new_empty(0)
    return _output_like(input), dweight, dbias


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, running_mean, running_var, training, _, eps, l2_eps, rescale = inputs
    _, scale, _, _ = output
    # eval uses the running statistics the forward read: saved as they were (they are not updated in eval)
    ctx.save_for_backward(input, scale, weight, None if training else running_mean,
                          None if training else running_var)
    ctx.options = (training, eps, l2_eps, rescale, bias is not None, input.dtype if bias is None else bias.dtype)


def _backward(ctx, grad_y: Tensor, *unused: Tensor | None):
    input, scale, weight, running_mean, running_var = ctx.saved_tensors
    training, eps, l2_eps, rescale, has_bias, bias_dtype = ctx.options
    dx, dweight, dbias = cpu_backward(grad_y, input, scale, weight, running_mean, running_var, training, eps, l2_eps,
                                      rescale, has_bias, bias_dtype)
    return (dx, dweight if weight is not None else None, dbias if has_bias else None,
            None, None, None, None, None, None, None)


cpu_forward.register_autograd(_backward, setup_context=_setup_context)


class _CoefficientForward(torch.autograd.Function):
    """The forward in a compiled graph: the statistics from the kernel (:func:`cpu_output_coefficients`), the output
    y = x·A + S in torch ops, which the compiler fuses with the ops after the layer (a ReLU, a max-pool: one pass
    over the output instead of two), and the backward of :func:`cpu_forward` (same inputs and outputs)."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
        a, shift, scale, new_mean, new_var = cpu_output_coefficients(input, weight, bias, running_mean, running_var,
                                                                     training, momentum, eps, l2_eps, rescale)
        y = input * per_channel(a, input.dim()) + per_channel(shift, input.dim())  # in the accumulation dtype
        return y.to(input.dtype), scale, new_mean, new_var

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def l2_batch_norm_cpp_graph(
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
    """:func:`l2bn.kernels.cpp.l2_batch_norm_cpp` through the custom operators (what a compiled graph calls)."""
    check_on_cpu(input)
    # under torch.func transforms the whole-forward operator: torch.compile's copy of an autograd.Function has no
    # vmap rule (the operator has functorch's per-sample fallback)
    forward = cpu_forward if torch._C._are_functorch_transforms_active() else _CoefficientForward.apply
    y, _, new_mean, new_var = forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps,
                                      rescale)
    if _updates(training, running_mean, running_var):
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
