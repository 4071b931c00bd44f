"""The compiled CPU kernel as operators that ``torch.compile`` keeps in its graphs.

Eager calls reach the kernel through its own operator, whose autograd node is C++ (no Python a call). That
operator cannot be traced — its C++ runs on real data — so ``torch.compile`` used to trace the torch-op fused
path instead, which Inductor fuses but which ran slower than the kernel (ResNet-20 SGD steps, NCHW, 2-core CPU:
compiled L2BN 1.16× compiled BatchNorm; docs/performance.md, "Session 22"). The kernel therefore also defines
functional operators for graphs (``csrc/l2bn_cpu.cpp``, section "Functional operators for compiled graphs"; in C++
with CPU kernels, so that a graph pays the dispatcher's ~7 µs a call where a Python ``torch.library.custom_op``
cost ~60, docs/performance.md, "Session 24"), and this module registers their fake implementations (shapes and
layouts only) and the whole forward's autograd formula once the kernel is loaded (:func:`l2bn.kernels.cpp.on_load`).
A compiled graph calls them as opaque kernels and compiles everything around them:

- ``l2bn_cpu::graph_coefficients`` → (A (N, C), S (C,), scale, running mean, running variance): the forward's
  statistics pass alone (in eval the sample norms, the channel statistics being the running ones);
  :class:`_CoefficientForward` writes y = x·A + S in torch ops, which Inductor fuses with the ops after the layer
  (ReLU, a residual addition, a max-pool: one pass over the output where the whole forward operator and a ReLU
  made two). y is within a rounding of the kernel's (it fuses the multiply and add);
- ``l2bn_cpu::graph_forward`` → (y, scale, running mean, running variance): the whole forward, under torch.func
  transforms (torch.compile's copy of an autograd.Function has no vmap rule);
- ``l2bn_cpu::graph_backward`` → (dx, dweight, dbias) from (dy, x·scale), dx times scale (the chain rule of the
  rescaling), the backward of both forwards; the parameter gradients are empty (0,) tensors where the layer has
  no weight or no bias.

Inference (eval with nothing to differentiate) of small inputs — up to ``GRAPH_INFERENCE_TORCH_OPS_MAX`` values,
a CIFAR ResNet's layers at batch 4 — traces the torch-op path instead, whose per-sample norms and output Inductor
fuses with the convolution's consumers: compiled inference at batch 1, ResNet-20/56 1.17–1.26× compiled BatchNorm
through the operators, 1.07–1.10× so (docs/performance.md, "Session 29").

``scale`` holds the per-sample powers of two the input was multiplied by — ones, but for finite samples whose sum
of squares overflows, which the kernel refuses and which run again rescaled (the factors of kernels/overflow.py,
computed in C++ by the same ATen operations; L2BN is invariant to a positive scale of a sample). The running
statistics are returned updated and :func:`l2_batch_norm_cpp_graph` copies them into the buffers (an operator with
an autograd formula must not write its inputs).

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

from .cpp import check_on_cpu, on_load
from .fused import l2_batch_norm_fused, needs_autograd, per_channel


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


def _fake_statistics(input: Tensor, training: bool, running_mean: Tensor | None, running_var: Tensor | None
                     ) -> tuple[Tensor, Tensor]:
    """The running statistics the forward operators return: updated copies, or empty (0,) tensors."""
    if _updates(training, running_mean, running_var):
        return torch.empty_like(running_mean), torch.empty_like(running_var)
    return input.new_empty(0), input.new_empty(0)


def _fake_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
    scale = input.new_empty(input.shape[0], dtype=_scale_dtype(input))
    return (_output_like(input), scale, *_fake_statistics(input, training, running_mean, running_var))


def _fake_coefficients(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
    (n, c), dtype = input.shape[:2], _scale_dtype(input)
    return (input.new_empty((n, c), dtype=dtype), input.new_empty(c, dtype=dtype), input.new_empty(n, dtype=dtype),
            *_fake_statistics(input, training, running_mean, running_var))


def _fake_backward(grad_out, input, scale, weight, running_mean, running_var, training, eps, l2_eps, rescale,
                   has_bias, bias_dtype):
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
    dx, dweight, dbias = torch.ops.l2bn_cpu.graph_backward.default(
        grad_y, input, scale, weight, running_mean, running_var, training, eps, l2_eps, rescale, has_bias, bias_dtype)
    return (dx, dweight if weight is not None else None, dbias if has_bias else None,
            None, None, None, None, None, None, None)


def _register() -> None:
    """The graph operators' fake implementations and the whole forward's autograd formula (run by
    :func:`l2bn.kernels.cpp.on_load`: registrations need the operators defined)."""
    torch.library.register_fake("l2bn_cpu::graph_forward", _fake_forward)
    torch.library.register_fake("l2bn_cpu::graph_coefficients", _fake_coefficients)
    torch.library.register_fake("l2bn_cpu::graph_backward", _fake_backward)
    torch.library.register_autograd("l2bn_cpu::graph_forward", _backward, setup_context=_setup_context)


on_load(_register)


class _CoefficientForward(torch.autograd.Function):
    """The forward in a compiled graph: the statistics from the kernel (``graph_coefficients``), the output
    y = x·A + S in torch ops, which the compiler fuses with the ops after the layer (a ReLU, a max-pool: one pass
    over the output instead of two), and the backward of ``graph_forward`` (same inputs and outputs)."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale):
        a, shift, scale, new_mean, new_var = torch.ops.l2bn_cpu.graph_coefficients.default(
            input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale)
        y = input * per_channel(a, input.dim()) + per_channel(shift, input.dim())  # in the accumulation dtype
        return y.to(input.dtype), scale, new_mean, new_var

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# Inference (eval, no gradient) in a compiled graph of inputs up to this many values traces the torch-op path: there
# an operator call's fixed cost outweighs the kernel's single read (measured on the 2-core CPU: the module docstring;
# at batches of 8 and more, with layers above this size, the torch ops were no faster, at 16 slower).
GRAPH_INFERENCE_TORCH_OPS_MAX = 65_536


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
    """:func:`l2bn.kernels.cpp.l2_batch_norm_cpp` through the graph operators (what a compiled graph calls);
    inference (eval, nothing to differentiate) of inputs up to ``GRAPH_INFERENCE_TORCH_OPS_MAX`` values through the
    torch-op path instead."""
    check_on_cpu(input)
    if not training and input.numel() <= GRAPH_INFERENCE_TORCH_OPS_MAX and not needs_autograd(input, weight, bias):
        return l2_batch_norm_fused(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   rescale=rescale, l2_eps=l2_eps)
    # under torch.func transforms the whole-forward operator: torch.compile's copy of an autograd.Function has no
    # vmap rule (the operator has functorch's per-sample fallback)
    whole = torch._C._are_functorch_transforms_active()
    forward = torch.ops.l2bn_cpu.graph_forward.default if whole else _CoefficientForward.apply
    y, _, new_mean, new_var = forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps,
                                      rescale)
    if _updates(training, running_mean, running_var):
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
