"""The compiled CPU kernel under torch.compile: its custom operators in the graph, equal to the eager kernel."""
from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import l2bn
from l2bn.kernels import cpp
from l2bn.kernels.cpp_custom_op import l2_batch_norm_cpp_graph
from l2bn.kernels.overflow import huge_sample_scale

pytestmark = pytest.mark.skipif(not cpp.compiler_found(), reason="no C++ compiler: the compiled kernel cannot be built")
LAYOUTS = pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                                  ids=["nchw", "nhwc"])


def graph_op(name: str) -> torch._ops.OpOverload:
    """The kernel's graph operator ``l2bn_cpu::<name>`` (building or loading the kernel)."""
    return getattr(cpp.operators(), name).default


def run(fn, x, weight, bias, training, grad):
    """Output, input/weight/bias gradients and running statistics of ``fn`` (the functional signature)."""
    xx, w, b = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    rm, rv = torch.full((x.shape[1],), 0.3), torch.full((x.shape[1],), 1.7)
    y = fn(xx, rm, rv, w, b, training, 0.1, 1e-5)
    y.backward(grad)
    return {"y": y, "dx": xx.grad, "dw": w.grad, "db": b.grad, "rm": rm, "rv": rv}


def assert_within_a_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """An output written by torch ops from the kernel's coefficients against the kernel's own: y = x·A + S
    rounded after the multiply and the add where the kernel fuses them (a few units in the last place of the
    largest value)."""
    torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(want.dtype).eps * want.abs().max().item())


@pytest.mark.parametrize("shape, memory_format, dtype", [
    ((5, 6, 4, 3), torch.contiguous_format, torch.float32), ((5, 6, 4, 3), torch.channels_last, torch.float32),
    ((5, 6), torch.contiguous_format, torch.float32), ((5, 6, 7), torch.contiguous_format, torch.float32),
    ((2, 6, 3, 4, 5), torch.channels_last_3d, torch.float32), ((5, 6, 4, 3), torch.channels_last, torch.bfloat16),
    ((3, 6, 2, 2), torch.contiguous_format, torch.float64), ((48, 6, 3, 3), torch.channels_last, torch.float32),
    ((1, 6, 32, 32), torch.contiguous_format, torch.float32),  # fewer samples than threads: the split norms
], ids=["nchw", "nhwc", "1d", "1d-length", "3d-cl", "nhwc-bf16", "fp64", "many-samples", "one-sample"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_custom_operators_equal_the_eager_kernel_bit_for_bit(training, shape, memory_format, dtype):
    """Outputs (and their strides), gradients and running statistics through the custom operators are the eager
    kernel's, bit for bit: the same kernel, called in another way (1d, 2d, 3d; 16-, 32- and 64-bit); the output
    within a rounding (:func:`assert_within_a_rounding`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    want = run(cpp.l2_batch_norm_cpp, x, weight, bias, training, grad)
    got = run(l2_batch_norm_cpp_graph, x, weight, bias, training, grad)
    for key in want:
        if key == "y":
            assert_within_a_rounding(got["y"], want["y"])
        else:
            assert torch.equal(got[key], want[key]), key
    running = torch.full((6,), 0.3), torch.full((6,), 1.7)  # as run() gives them
    whole, _, _, _ = graph_op("graph_forward")(x, weight, bias, *running, training, 0.1, 1e-5, 1e-12, True)
    assert torch.equal(whole, want["y"])  # the whole-forward operator (torch.func transforms) is the kernel's own
    assert got["y"].stride() == want["y"].stride() and got["dx"].stride() == want["dx"].stride()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_custom_operators_pass_torch_library_opcheck(training, affine):
    """torch.library.opcheck: schema, fake implementations (shapes, dtypes, strides), autograd registration and
    the compiled-autograd path, for the three operators (with and without weight and bias). The operators take any
    layout (flexible_layout: Inductor passes its own), so the inputs are NCHW, channels-last and a strided view,
    with the gradient in either dense layout."""
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, 5, 3, 3, generator=g).contiguous(
        memory_format=torch.channels_last), torch.randn(4, 5, 3, 6, generator=g)[..., ::2]]
    for x, grad_format in itertools.product(inputs, (torch.contiguous_format, torch.channels_last)):
        x = x.requires_grad_()
        weight = (torch.rand(5, generator=g) + 0.5).requires_grad_() if affine else None
        bias = torch.randn(5, generator=g).requires_grad_() if affine else None
        running = torch.zeros(5), torch.ones(5)
        torch.library.opcheck(graph_op("graph_forward"), (x, weight, bias, *running, training, 0.1, 1e-5, 1e-12, True))
        detached = [None if t is None else t.detach() for t in (x, weight, bias)]  # no autograd formula of its own
        torch.library.opcheck(graph_op("graph_coefficients"), (*detached, *running, training, 0.1, 1e-5, 1e-12, True))
        scale = torch.ones(4)
        grad = torch.randn(x.shape, generator=g).contiguous(memory_format=grad_format)
        torch.library.opcheck(graph_op("graph_backward"), (grad, x.detach(), scale, None if weight is None else weight.detach(),
                                             *(running if not training else (None, None)), training, 1e-5, 1e-12,
                                             True, affine, torch.float32))


class ConvL2BN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), l2bn.L2BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def recording_compile(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """(``model`` under torch.compile(fullgraph=True), after a reset; the set of operators its forward and backward
    graphs call, filled as they compile). aot_eager: the graphs' ops run as in eager."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from functorch.compile import make_boxed_func

    called: set[str] = set()

    def record(graph_module, _):
        called.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module)

    def backend(graph_module, example_inputs):
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=record, bw_compiler=record)

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True), called


@LAYOUTS
def test_compiled_graphs_hold_the_kernel_and_match_eager(memory_format):
    """torch.compile(fullgraph=True) of a conv + L2BN + ReLU model on the CPU: the forward graphs call
    l2bn_cpu::graph_coefficients, the backward graphs l2bn_cpu::graph_backward (not the fused path's ops); gradients and
    running statistics over a training and an eval step equal the eager model's bit for bit, the outputs within a
    rounding (aot_eager: the graph's other ops run as in eager)."""
    torch.manual_seed(0)
    model = ConvL2BN().to(memory_format=memory_format)
    eager = copy.deepcopy(model)
    compiled, called = recording_compile(model)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=memory_format)
    for training in (True, False):
        model.train(training)
        eager.train(training)
        y, y_eager = compiled(x), eager(x)
        assert_within_a_rounding(y, y_eager)
        grad = torch.randn(y.shape)  # not a function of y: the gradients see the same dy
        y.backward(grad)
        y_eager.backward(grad)
    for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, p_eager.grad), name
    assert torch.equal(model.norm.running_mean, eager.norm.running_mean)
    assert torch.equal(model.norm.running_var, eager.norm.running_var)
    assert {"l2bn_cpu.graph_coefficients.default", "l2bn_cpu.graph_backward.default"} <= called, called
    assert not any("var_mean" in op or "linalg_vector_norm" in op for op in called), called


@LAYOUTS
def test_compiled_inference_of_small_inputs_traces_the_torch_ops(memory_format, monkeypatch):
    """Inference in a compiled graph (eval under no_grad): an input of up to GRAPH_INFERENCE_TORCH_OPS_MAX values
    traces the torch-op path, which the compiler fuses with the ops around it (no l2bn_cpu operator in the graph); a
    larger one calls graph_coefficients; both within a rounding of eager. Eval with a gradient keeps the operators
    whatever the size (the test above, at 1152 values)."""
    import l2bn.kernels.cpp_custom_op as graph_ops

    assert graph_ops.GRAPH_INFERENCE_TORCH_OPS_MAX >= 16 * 32 * 32  # a CIFAR ResNet's first stage at batch 1
    torch.manual_seed(0)
    model = ConvL2BN().to(memory_format=memory_format).eval()
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=memory_format)  # the norm's input: 4·8·6·6 = 1152 values
    with torch.no_grad():
        want = model(x)
        for limit, operators in ((1152, False), (1151, True)):
            monkeypatch.setattr(graph_ops, "GRAPH_INFERENCE_TORCH_OPS_MAX", limit)
            compiled, called = recording_compile(model)
            y = compiled(x)
            assert_within_a_rounding(y, want)
            assert any(op.startswith("l2bn_cpu.") for op in called) == operators, (limit, called)
            assert ("l2bn_cpu.graph_coefficients.default" in called) == operators


def test_forced_cpp_under_compile_refuses_other_devices_as_eager_does():
    """impl="cpp" for a tensor off the CPU: the function compiled graphs call refuses it with the eager path's
    error and way out (not the custom operator's missing-kernel error)."""
    x = torch.randn(2, 3, 4, 4, device="meta")
    with pytest.raises(RuntimeError, match="impl='cpp' runs on the CPU, got input on meta; use impl='auto'"):
        l2_batch_norm_cpp_graph(x, None, None, training=True)


def test_kernel_availability_is_a_constant_to_torch_compile():
    """cpp.available carries what torch.compiler.assume_constant_result sets (set directly there, so that importing
    l2bn does not import torch._dynamo): the decorator sets exactly that attribute, and available has it."""
    def probe() -> bool:
        return True

    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == {"_dynamo_marked_constant": True}
    assert cpp.available._dynamo_marked_constant is True


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_overflowing_samples_rerun_rescaled_inside_the_operator(training):
    """A finite sample whose sum of squares overflows float32 (1e30, 3e38): the forward operators rerun the batch
    rescaled and hand the factors to the backward operator, which scales dx by them — gradients and running
    statistics equal the eager path's (which reruns through autograd) bit for bit, the output within a rounding
    (the coefficients operator folds the factors into A)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, 3, generator=g)
    x[1] *= 1e30
    x[3, :, 0] = 3e38
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    grad = torch.randn(x.shape, generator=g)
    want = run(cpp.l2_batch_norm_cpp, x, weight, bias, training, grad)
    got = run(l2_batch_norm_cpp_graph, x, weight, bias, training, grad)
    assert torch.isfinite(want["y"]).all() and want["dx"][1].abs().max() > 0
    for key in want:
        if key == "y":
            assert_within_a_rounding(got["y"], want["y"])
        else:
            assert torch.equal(got[key], want[key]), key
    _, scale, _, _ = graph_op("graph_forward")(x, weight, bias, None, None, training, 0.1, 1e-5, 1e-12, True)
    assert scale[0] == scale[2] == 1 and scale[1] < 1e-20 and scale[3] < 1e-30
    _, _, coefficient_scale, _, _ = graph_op("graph_coefficients")(x, weight, bias, None, None, training, 0.1, 1e-5,
                                                             1e-12, True)
    assert torch.equal(coefficient_scale, scale)


def test_registrations_for_the_operators_run_once_the_kernel_is_loaded():
    """cpp.on_load: a registration asked for after the kernel is loaded runs at once (before: at the load, once);
    a fresh process whose first L2BN call is inside torch.compile gets the fake implementations in time."""
    cpp.operators()
    calls = []
    cpp.on_load(lambda: calls.append("registered"))
    try:
        assert calls == ["registered"]
        assert cpp.available() and calls == ["registered"]
    finally:
        cpp._ON_LOAD.pop()
    first_call_compiled = (
        "import torch, l2bn\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm2d(8), torch.nn.ReLU())\n"
        "x = torch.randn(4, 3, 8, 8)\n"
        "torch.compile(m, fullgraph=True, backend='aot_eager')(x).sum().backward()\n")
    result = subprocess.run([sys.executable, "-c", first_call_compiled], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_graph_operators_rescale_by_the_factors_of_overflow_py(dtype):
    """The C++ rerun's factors (csrc's huge_sample_factors) are kernels/overflow.py's, sample by sample: 1 below
    2^32, the power of two into [2^15, 2^16) from 2^32 up (here a sample at exactly 2^32 beside the overflowing
    one), for 32-, 64- and 16-bit input."""
    huge = 1e200 if dtype == torch.float64 else 1e30
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1] *= huge
    x[2, 0, 0, 0], x[3, 0, 0, 0] = 2.0**32, 2.0**31
    x = x.to(dtype)
    want = huge_sample_scale(x).reshape(-1).to(torch.promote_types(dtype, torch.float32))
    assert want[0] == want[3] == 1 and want[2] == 2.0**-17 and 0 < want[1] < 1 / huge * 2**16
    for name, scale_index in (("graph_forward", 1), ("graph_coefficients", 2)):
        scale = graph_op(name)(x, None, None, None, None, True, 0.1, 1e-5, 1e-12, True)[scale_index]
        assert torch.equal(scale, want), name


@pytest.mark.slow  # Inductor compiles C++ (~15-30 s); the default suite's graph test runs aot_eager
def test_inductor_compiled_training_matches_eager():
    """The same model under Inductor (the default backend: generated C++ around the operators) over two training
    steps and an eval forward: outputs, gradients and running statistics match eager to float32 rounding (Inductor
    fuses the convolution's neighbours in its own order)."""
    torch.manual_seed(3)
    model = ConvL2BN()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6)
        y, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y_eager.square().sum().backward()
    for p, p_eager in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.norm.running_var, eager.norm.running_var, rtol=1e-6, atol=1e-7)
    model.eval()
    eager.eval()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # Inductor compiles C++ (~15-30 s)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inductor_hands_the_operator_its_convolution_output_as_it_is(training):
    """With the convolution's output channels-last (Inductor's layout optimisation, forced on for this small model)
    the forward operator takes that buffer itself: no copy back to the NCHW strides seen while tracing (the
    operators are tagged flexible_layout), and the output matches eager."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(4)
    model = ConvL2BN().train(training)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    torch._dynamo.reset()
    with inductor_config.patch(force_layout_optimization=True, fx_graph_cache=False):
        y, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
    conv = re.search(r"(buf\d+) = extern_kernels\.convolution\(", codes[0])
    call = re.search(r"torch\.ops\.l2bn_cpu\.graph_(?:forward|coefficients)\.default\((\w+),", codes[0])
    assert conv and call and call.group(1) == conv.group(1), codes[0]
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)


class ConvL2BNPool(ConvL2BN):
    def forward(self, x):
        return nn.functional.max_pool2d(super().forward(x), 2)


@pytest.mark.slow  # Inductor compiles C++ (~15-30 s)
def test_inductor_writes_the_gradient_in_the_saved_inputs_layout():
    """A channels-last conv + L2BN + ReLU + max-pool model under Inductor: the backward operator gets dy in x's
    layout (the kernel would copy it otherwise; with the backward operator tagged flexible_layout, max-pool's backward
    left dy NCHW), and the gradients match eager."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layouts = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is graph_op("graph_backward"):
                layouts.append((args[0].stride(), args[1].stride()))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(5)
    model = ConvL2BNPool().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False):
        compiled = torch.compile(model, fullgraph=True)
        loss = compiled(x).square().sum()
        with Recording():
            loss.backward()
    eager(x).square().sum().backward()
    assert layouts and all(grad == saved for grad, saved in layouts), layouts
    for p, p_eager in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-5)


def test_torch_func_transforms_inside_torch_compile():
    """Per-sample gradients (vmap of grad) and a vmapped forward of a training layer inside torch.compile: the
    forward operator with its autograd formula, through functorch's per-sample fallback (torch.compile's copy of
    the output-fusing autograd.Function has no vmap rule), equal to the same transforms in eager. Both graph-break
    (vmap at the module's repr, vmap(grad) at the operator's autograd under functorch) and run those parts eagerly;
    Dynamo then skips the frames it failed on in later compiles of the process, so the test resets it after."""
    from torch.func import functional_call, grad, vmap

    layer = l2bn.L2BatchNorm2d(3)
    torch.func.replace_all_batch_norm_modules_(layer)
    params = dict(layer.named_parameters())
    x = torch.randn(2, 4, 3, 5, 5)

    def per_sample(x):
        return functional_call(layer, params, (x,)).sin().sum()

    torch._dynamo.reset()
    try:
        got_grad = torch.compile(lambda x: vmap(grad(per_sample))(x), backend="aot_eager")(x)
        got = torch.compile(lambda x: vmap(layer)(x), backend="aot_eager")(x)
    finally:  # see the docstring
        torch._dynamo.reset()
    torch.testing.assert_close(got_grad, vmap(grad(per_sample))(x))
    torch.testing.assert_close(got, vmap(layer)(x))
