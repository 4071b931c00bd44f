"""Wherever BatchNorm works, L2BN works (or says clearly why not): export, ONNX, tracing, fx, torch.func.

Every check compares against an independent float64 formula or against the module run eagerly; each backs
a row of README's compatibility table.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

import l2bn
from l2bn.kernels import cpp, dispatch

F64 = torch.float64
NO_COMPILER = pytest.mark.skipif(not cpp.compiler_found(), reason="no C++ compiler: the compiled kernel cannot be built")
FAST = [pytest.param("cpp", marks=NO_COMPILER), "fused"]


def formula(x: torch.Tensor, layer: nn.Module, training: bool) -> torch.Tensor:
    """Eq. (3) then BatchNorm, in float64, with the layer's parameters (batch or running statistics)."""
    x = x.to(F64)
    flat = x.reshape(x.shape[0], -1)
    xhat = (flat * math.sqrt(flat.shape[1]) / flat.norm(dim=1, keepdim=True)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if training:
        dims = [0, *range(2, x.dim())]
        mean, var = xhat.mean(dim=dims, keepdim=True), xhat.var(dim=dims, unbiased=False, keepdim=True)
    else:
        mean, var = layer.running_mean.to(F64).view(shape), layer.running_var.to(F64).view(shape)
    bias = 0.0 if layer.bias is None else layer.bias.to(F64).view(shape)
    return (xhat - mean) / torch.sqrt(var + layer.eps) * layer.weight.to(F64).view(shape) + bias


class ConvL2BN(nn.Module):
    """conv → L2BN → ReLU → conv → L2BN: gradients must reach every parameter and the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm1 = nn.Conv2d(3, 6, 3, padding=1), l2bn.L2BatchNorm2d(6)
        self.conv2, self.norm2 = nn.Conv2d(6, 4, 3, padding=1), l2bn.L2BatchNorm2d(4)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))


def sample(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 4 + 0.2)


def gradients(model: nn.Module, x: torch.Tensor, call=None) -> dict[str, torch.Tensor]:
    """Output, input and parameter gradients of ``model`` (run through ``call``, default the model)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad()
    out = (model if call is None else call)(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    grads["output"] = out.detach()
    return grads


DYNAMIC = {"x": {0: Dim("N", min=2, max=64), 2: Dim("H", min=4, max=64), 3: Dim("W", min=4, max=64)}}


# --- torch.export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", FAST + ["reference"])
def test_export_training_gives_every_gradient(impl, monkeypatch):
    """Backward through ``torch.export(...).module()`` equals eager backward, for any forced impl."""
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    eager, model = ConvL2BN(), ConvL2BN()
    exported = torch.export.export(model, (sample(4, 8, 8),)).module()
    want, got = gradients(eager, sample(4, 8, 8, seed=2)), gradients(exported, sample(4, 8, 8, seed=2))
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    for norm_e, norm_x in ((eager.norm1, model.norm1), (eager.norm2, model.norm2)):
        torch.testing.assert_close(norm_x.running_mean, norm_e.running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_dynamic_batch_and_spatial_sizes(training):
    """D is read from the input's shape inside the graph: other N, H, W give the right answer."""
    model = ConvL2BN().train(training)
    program = torch.export.export(copy.deepcopy(model), (sample(2, 16, 16),), dynamic_shapes=DYNAMIC)
    exported = program.module()
    for n, h, w in ((2, 16, 16), (5, 24, 20), (3, 7, 9)):
        x = sample(n, h, w, seed=n)
        torch.testing.assert_close(exported(x), copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)


def test_exported_program_holds_only_aten_ops_and_loads_without_l2bn(tmp_path):
    """A saved ExportedProgram (eval) reloads and runs in a process that never imports l2bn."""
    model = ConvL2BN().eval()
    program = torch.export.export(model, (sample(2, 8, 8),), dynamic_shapes=DYNAMIC)
    assert all(
        not str(node.target).startswith("l2bn") for node in program.graph.nodes if node.op == "call_function"
    )
    path, x = tmp_path / "model.pt2", sample(3, 10, 12)
    torch.export.save(program, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)\n"
    )
    run_clean(code)


def run_clean(code: str) -> None:
    """Run ``code`` in a fresh interpreter where importing l2bn raises (``sys.modules['l2bn'] = None``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['l2bn'] = None\n" + code],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- torch.jit ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_is_portable_and_shape_generic(training, tmp_path):
    model = ConvL2BN().train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(copy.deepcopy(model), sample(2, 8, 8))
    assert "l2bn_cpu" not in str(traced.inlined_graph)
    x = sample(4, 12, 10, seed=3)
    torch.testing.assert_close(traced(x), copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    torch.save(x, tmp_path / "x.pt")
    torch.save(copy.deepcopy(model)(x).detach(), tmp_path / "y.pt")
    run_clean(
        "import torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)\n"
    )


def test_jit_script_refuses_naming_trace_and_export():
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.jit\.trace or torch\.export"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), l2bn.L2BatchNorm2d(4)))


# --- ONNX ----------------------------------------------------------------------------------------------------

try:
    import onnx  # noqa: F401
    import onnxruntime
    import onnxscript  # noqa: F401
except ImportError:  # pragma: no cover - the onnx extra is not installed
    onnxruntime = None
NEEDS_ONNX = pytest.mark.skipif(onnxruntime is None, reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")


@NEEDS_ONNX
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_matches_pytorch_at_traced_and_other_sizes(dynamo, tmp_path):
    model = ConvL2BN().eval()
    path = tmp_path / "model.onnx"
    if dynamo:
        torch.onnx.export(model, (sample(2, 16, 16),), str(path), dynamo=True, dynamic_shapes=DYNAMIC)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (sample(2, 16, 16),), str(path), dynamo=False, input_names=["x"],
                dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}},
            )
    session = onnxruntime.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    for n, h, w in ((2, 16, 16), (5, 24, 20), (1, 9, 13)):
        x = sample(n, h, w, seed=h)
        (got,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got).double(), formula_model(model, x), rtol=1e-4, atol=1e-4)


def formula_model(model: ConvL2BN, x: torch.Tensor) -> torch.Tensor:
    """ConvL2BN in eval mode with every L2BN replaced by :func:`formula` (float64)."""
    with torch.no_grad():
        h = F.relu(formula(model.conv1.double()(x.double()), model.norm1, False))
        out = formula(model.conv2.double()(h), model.norm2, False)
    model.float()
    return out


# --- torch.fx --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_fx_symbolic_trace_records_the_layer(momentum):
    model = ConvL2BN()
    model.norm1.momentum = model.norm2.momentum = momentum
    graph_module = torch.fx.symbolic_trace(model)
    assert int(model.norm1.num_batches_tracked) == 0  # tracing ran nothing
    eager = copy.deepcopy(model)
    for step in range(3):
        x = sample(4, 6, 6, seed=step)
        torch.testing.assert_close(graph_module(x), eager(x))
    torch.testing.assert_close(model.norm2.running_var, eager.norm2.running_var)
    assert int(model.norm2.num_batches_tracked) == int(eager.norm2.num_batches_tracked) == 3


def test_torchvision_feature_extractor_on_converted_resnet():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    model = l2bn.convert_to_l2bn(torchvision.models.resnet18(num_classes=10)).eval()
    extractor = create_feature_extractor(model, {"layer2": "mid", "fc": "logits"})
    x = torch.randn(2, 3, 48, 48)
    out = extractor(x)
    torch.testing.assert_close(out["logits"], model(x))
    assert out["mid"].shape == (2, 128, 6, 6)


# --- torch.func and batched gradients --------------------------------------------------------------------

@pytest.mark.parametrize("impl", FAST + ["reference"])
def test_torch_func_grad_jacrev_vmap(impl, monkeypatch):
    """As with BatchNorm, running-statistics updates cannot run under a transform: the layer is patched
    with ``replace_all_batch_norm_modules_`` (or used in eval mode)."""
    from torch.func import functional_call, grad, jacrev, vmap

    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    layer = l2bn.L2BatchNorm2d(3, dtype=F64)
    torch.func.replace_all_batch_norm_modules_(layer)
    x = sample(4, 3, 3).double()
    params = dict(layer.named_parameters())

    def loss(x):
        return functional_call(layer, params, (x,)).sin().sum()

    want_x = x.clone().requires_grad_()
    formula(want_x, layer, True).sin().sum().backward()
    torch.testing.assert_close(grad(loss)(x), want_x.grad)
    jac = jacrev(lambda x: layer(x))(x)
    want_jac = torch.autograd.functional.jacobian(lambda x: formula(x, layer, True), x)
    torch.testing.assert_close(jac, want_jac)
    batch = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(vmap(layer)(batch), torch.stack([formula(b, layer, True) for b in batch]))


def _formula_with(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, training: bool):
    """:func:`formula` with ``weight`` and ``bias`` in place of the layer's (differentiable in them)."""
    shape = (1, -1, 1, 1)
    plain = formula(x, layer, training)
    with torch.no_grad():
        standardised = (plain - layer.bias.to(F64).view(shape)) / layer.weight.to(F64).view(shape)
    return standardised * weight.view(shape) + bias.view(shape)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's jvp decompositions
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", ["auto", *FAST, "reference"])
def test_transforms_over_the_parameters_only(training, impl, monkeypatch):
    """torch.func.grad over the weight and bias of a plain input (functional_call: meta-learning, per-model
    gradients) and a forward-mode dual weight take the reference composition under every setting (the compiled
    op refused both: "cannot use C++ torch::autograd::Function with functorch transforms", "jvp")."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad

    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    layer = l2bn.L2BatchNorm2d(3, dtype=F64).train(training)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.normal_()
    if training:  # no running-statistics update under a transform (as for BatchNorm)
        torch.func.replace_all_batch_norm_modules_(layer)
    x = sample(4, 3, 3).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params):
        return functional_call(layer, params, (x,)).sin().sum()

    w, b = (params[k].clone().requires_grad_() for k in ("weight", "bias"))
    _formula_with(layer, w, b, x, training).sin().sum().backward()
    got = grad(loss)(params)
    torch.testing.assert_close(got["weight"], w.grad)
    torch.testing.assert_close(got["bias"], b.grad)
    tangent = torch.randn(3, dtype=F64)
    _, want = torch.autograd.functional.jvp(lambda w: _formula_with(layer, w, params["bias"], x, training),
                                            params["weight"], tangent)
    with fwAD.dual_level():
        dual = fwAD.make_dual(params["weight"], tangent)
        out = fwAD.unpack_dual(l2bn.l2_batch_norm(x, None if training else layer.running_mean,
                                                  None if training else layer.running_var, dual, params["bias"],
                                                  training, 0.1, layer.eps))
    torch.testing.assert_close(out.tangent, want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's jvp decompositions
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", ["auto", *FAST, "reference"])
def test_forward_mode_ad_dual_inputs(training, impl, monkeypatch):
    """torch.autograd.forward_ad (a dual input, no torch.func): every setting runs the reference composition,
    whose tangent is the formula's jvp (the fast paths have no jvp; the compiled kernel used to refuse)."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    layer = l2bn.L2BatchNorm2d(3, dtype=F64).train(training)
    layer.running_mean.normal_()
    x, v = sample(4, 3, 3).double(), torch.randn(4, 3, 3, 3, dtype=F64)
    want_y, want_t = torch.autograd.functional.jvp(lambda x: formula(x, layer, training), x, v)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(layer(fwAD.make_dual(x, v)))
    torch.testing.assert_close(out.primal, want_y)
    torch.testing.assert_close(out.tangent, want_t)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", [None, *FAST, "reference"])
def test_gradcheck_batched_grad(training, impl):
    """gradcheck with its defaults (check_batched_grad=True) on every path, the default (None) included."""
    x = sample(3, 2, 3).double().requires_grad_()
    w = torch.rand(3, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5

    def fn(x, w):
        return l2bn.l2_batch_norm(x, rm.clone(), rv.clone(), w, None, training, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, w))


@NO_COMPILER
@pytest.mark.parametrize("frozen_weight", [False, True], ids=["weight", "frozen-weight"])
def test_compiled_kernel_batched_gradients_equal_the_unbatched_ones(frozen_weight):
    x = sample(3, 2, 3).double().requires_grad_()
    w = torch.rand(3, dtype=F64, requires_grad=not frozen_weight)
    b = torch.rand(3, dtype=F64, requires_grad=True)
    y = l2bn.l2_batch_norm(x, None, None, w, b, training=True, impl="cpp")
    inputs = (x, b) if frozen_weight else (x, w, b)
    dys = torch.randn(2, *y.shape, dtype=F64)
    batched = torch.autograd.grad(y, inputs, dys, is_grads_batched=True, retain_graph=True)
    for i, dy in enumerate(dys):
        for got, want in zip(batched, torch.autograd.grad(y, inputs, dy, retain_graph=True)):
            torch.testing.assert_close(got[i], want)


@NO_COMPILER
def test_compiled_kernel_frees_its_graph_unless_retained():
    x = sample(3, 2, 3).double().requires_grad_()
    y = l2bn.l2_batch_norm(x, None, None, training=True, impl="cpp")
    torch.nn.functional.relu_(y)  # in-place on the output, as ResNets do
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


# --- layer API -------------------------------------------------------------------------------------------

@pytest.mark.needs_batchnorm_bias
def test_bias_false_like_batchnorm_and_round_trip():
    layer = l2bn.L2BatchNorm2d(5, bias=False)
    bn = nn.BatchNorm2d(5, bias=False)
    assert layer.bias is None and set(layer.state_dict()) == set(bn.state_dict())
    back = l2bn.convert_to_bn(l2bn.convert_to_l2bn(nn.Sequential(bn)))
    assert type(back[0]) is nn.BatchNorm2d and back[0].bias is None
    x = sample(4, 3, 3).repeat(1, 2, 1, 1)[:, :5]
    torch.testing.assert_close(layer(x).double(), formula(x, layer, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FAST + ["reference"])
def test_eps_must_be_positive_in_training_like_batchnorm(impl):
    x = sample(4, 3, 3)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0"):
        l2bn.l2_batch_norm(x, None, None, training=True, eps=0.0, impl=impl)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        l2bn.l2_batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0, impl=impl)


def test_subpackages_load_on_attribute_access():
    code = "import l2bn; print(type(l2bn.norms.get_norm_layer('gn-cpg4')(8)).__name__, l2bn.models.__name__)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["GroupNormCPG", "l2bn.models"]


def test_py_typed_marker_ships():
    assert (Path(l2bn.__file__).parent / "py.typed").exists()


# --- numerics at the edges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("impl", FAST + ["reference"])
def test_a_non_finite_value_is_confined_to_its_channel(bad, impl):
    """As in BatchNorm: one inf/NaN in channel 2 leaves the other channels' outputs and running means finite
    (its sample is scaled to zero there, as an infinitely long sample is)."""
    x = sample(4, 5, 5)
    x[1, 2, 0, 0] = bad
    rm, rv = torch.zeros(3), torch.ones(3)
    y = l2bn.l2_batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True, impl=impl)
    assert torch.isfinite(y[:, :2]).all() and torch.isfinite(rm[:2]).all() and torch.isfinite(rv[:2]).all()
    assert torch.isnan(y[:, 2]).any() and torch.isnan(rm[2])
    finite = x.clone()
    finite[1] = 0.0  # the sample counted with r_n = 0 contributes zeros, like an all-zero sample
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    want = l2bn.l2_batch_norm(finite.double(), None, None, ones, zeros, True, impl="reference")
    torch.testing.assert_close(y[:, :2].double(), want[:, :2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", FAST + ["reference"])
def test_float64_input_into_float32_layer_errors_like_batchnorm(training, impl, monkeypatch):
    monkeypatch.setenv(dispatch.IMPL_ENV_VAR, impl)
    x = sample(4, 3, 3).double()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        nn.BatchNorm2d(3).train(training)(x)
    message = r"mixed dtype: input is torch.float64 but running_mean is torch.float32.*module.to"
    with pytest.raises(RuntimeError, match=message):
        l2bn.L2BatchNorm2d(3).train(training)(x)
    assert l2bn.L2BatchNorm2d(3).train(training)(x.bfloat16()).dtype == torch.bfloat16  # half input, fp32 module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_norms_do_not_overflow(dtype):
    """Values whose squares overflow float32 (1e20; also bfloat16's range) still give eq. (3)."""
    big = 1e20
    x = sample(4, 3, 3).to(dtype)
    want = l2bn.l2_batch_norm(x, None, None, training=True, impl="reference")
    got = l2bn.l2_batch_norm(x * big, None, None, training=True, impl="reference")
    assert torch.isfinite(got).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _triton_runnable() -> bool:
    """Whether the Triton path runs here: on CUDA, or on the CPU through the interpreter (conftest sets it)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    from l2bn.kernels import triton_l2bn

    return torch.cuda.is_available() or triton_l2bn.INTERPRETED


TRITON = pytest.param("triton", marks=pytest.mark.skipif(not _triton_runnable(), reason="triton cannot run here"))


def huge_sample_batch(dtype: torch.dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A batch with a 1e30-scale sample, a 1e20 one and a 3e38 one (near float32's largest) between normal samples."""
    x = sample(5, 4, 3, seed=3).to(F64)
    x[1] *= 1e30
    x[3] *= 1e20
    x[4] *= 3e38 / x[4].abs().max()
    return x.to(dtype).contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Triton's interpreter warns on the first, overflowing try
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("impl", FAST + ["fused-device-mode", TRITON, "compile"])
def test_fast_paths_huge_samples_against_float64(impl, dtype, training, memory_format, monkeypatch):
    """Finite samples whose squares overflow float32 (1e20, 1e30, 3e38 next to normal ones) give eq. (3) on
    every fast path: outputs, running statistics and input gradients, against the float64 formula.

    ``fused-device-mode`` runs the torch-op path as it runs on accelerators (float64 statistics, no host
    check: a rerun would fail the test), as Triton does (scaled in its kernels); ``compile`` is
    torch.compile(fullgraph=True) of the layer's function.
    """
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    layer_fn = l2bn.l2_batch_norm
    if impl == "triton":  # scaled in its kernels, on the device: never a rerun
        from l2bn.kernels import overflow

        monkeypatch.setattr(overflow, "huge_sample_scale", _no_rerun)
    if impl == "fused-device-mode":
        from l2bn.kernels import fused, overflow

        monkeypatch.setattr(fused, "statistics_dtype", lambda t: torch.float64 if t.dtype != F64 else F64)
        monkeypatch.setattr(overflow, "huge_sample_scale", _no_rerun)
        impl = "fused"
    elif impl == "compile":
        torch._dynamo.reset()
        layer_fn, impl = torch.compile(l2bn.l2_batch_norm, fullgraph=True, backend="aot_eager"), None
    x = huge_sample_batch(dtype, memory_format)
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    running = torch.randn(3, generator=g) * 0.1, torch.rand(3, generator=g) + 0.5
    dy = torch.randn(x.shape, generator=g, dtype=F64)

    def run(x, dtype, device, impl):
        xx = x.to(device, copy=True).requires_grad_()
        w, b = (t.to(device, dtype, copy=True).requires_grad_() for t in (weight, bias))
        rm, rv = (t.to(device, dtype, copy=True) for t in running)
        y = (layer_fn if impl != "reference" else l2bn.l2_batch_norm)(xx, rm, rv, w, b, training, 0.1, 1e-5, impl=impl)
        y.backward(dy.to(device, y.dtype))
        return {"y": y, "dx": xx.grad, "dw": w.grad, "db": b.grad, "rm": rm, "rv": rv}

    got = run(x, dtype, device, impl)
    want = run(x.to(F64), F64, "cpu", "reference")  # the rounded input, in float64
    # a sample's input gradient scales as r_n = sqrt(D)/‖x_n‖ (1e-30 for the 1e30 sample): compare dx_n / r_n
    r = want["y"][0].numel() ** 0.5 / x.to(F64).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    got["dx"], want["dx"] = got["dx"].to("cpu", F64) / r, want["dx"] / r
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter rounds float32 subnormals to bfloat16 wrongly (_convert_float in
        # triton/runtime/interpreter.py; a GPU's cvt does not): leave out the 3e38 sample's input gradient,
        # ~1e-39 and so subnormal in bfloat16. On a GPU every sample is compared.
        got["dx"], want["dx"] = got["dx"][:4], want["dx"][:4]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        torch.testing.assert_close(got[key].to("cpu", F64), want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")
    independent = formula(x, _layer_with(weight, bias, running), training)  # eq. (3) then BN, in float64
    torch.testing.assert_close(want["y"], independent, rtol=1e-9, atol=1e-9)


def _no_rerun(x):
    raise AssertionError("the path reran on a rescaled input: its own statistics overflowed")


def _layer_with(weight, bias, running) -> nn.Module:
    layer = nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.running_mean.copy_(running[0])
        layer.running_var.copy_(running[1])
    return layer


# Triton's interpreter warns on the first, overflowing try
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("impl", FAST + [TRITON])
def test_fast_paths_huge_and_non_finite_samples(impl):
    """A sample holding inf next to a 1e30-scale one: the huge one is rescaled, the inf one keeps BatchNorm's
    semantics (only its channel turns NaN)."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    x = huge_sample_batch(torch.float32)
    x[2, 1, 0, 0] = float("inf")
    y = l2bn.l2_batch_norm(x.to(device), None, None, training=True, impl=impl).cpu()
    want = l2bn.l2_batch_norm(x, None, None, training=True, impl="reference")
    assert y[:, 1].isnan().all() and torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(y[:, [0, 2]], want[:, [0, 2]], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("impl", FAST + [TRITON])
def test_fast_paths_huge_single_sample_eval(impl):
    """Eval with fewer samples than threads (the compiled kernel then splits each sample's norm): a lone
    1e30-scale sample gives the float64 reference's output and input gradient."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    x = huge_sample_batch(torch.float32)[1:2]
    running = torch.zeros(3), torch.ones(3)
    outputs = {}
    for name, xx in ((impl, x.to(device)), ("reference", x.to(F64))):
        xx = xx.clone().requires_grad_()
        y = l2bn.l2_batch_norm(xx, *(t.to(xx.device, xx.dtype) for t in running), training=False, impl=name)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y))
        outputs[name] = (y.to("cpu", F64), xx.grad.to("cpu", F64) * 1e30)
    for got, want in zip(outputs[impl], outputs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_huge_sample_scale_is_an_exact_power_of_two():
    """Only finite samples with max |x| ≥ 2^32 change, each by a power of two to max |x| in [2^15, 2^16);
    the gradient through the rescale is the factor; the usual input goes through untouched."""
    from l2bn.kernels.overflow import huge_sample_scale

    x = huge_sample_batch(torch.float32)
    x[2, 0, 0, 0] = float("nan")
    x[0] *= 1e-20  # tiny: must not be scaled up (l2_eps clamping would change)
    xx = x.clone().requires_grad_()
    scaled = xx * huge_sample_scale(xx)
    for n in range(x.shape[0]):
        amax = x[n].abs().max()
        if n in (1, 3, 4):
            factor = scaled[n].flatten()[0] / x[n].flatten()[0]
            assert torch.frexp(factor).mantissa == 0.5  # a power of two
            assert torch.equal(scaled[n], x[n] * factor)
            assert 2.0**15 <= scaled[n].abs().max() < 2.0**16, amax
        else:
            assert torch.equal(scaled[n], x[n]) or (n == 2 and torch.equal(scaled[n].isnan(), x[n].isnan()))
    scaled.sum().backward()
    factors = (scaled.detach() / x)[:, 0, 0, 1].view(-1, 1, 1, 1)  # x[:, 0, 0, 1] is finite and non-zero
    assert torch.equal(xx.grad, factors.expand_as(x))


@pytest.mark.slow
def test_torch_compile_dynamic_shapes_recompile_no_more_than_batchnorm():
    """torch.compile(dynamic=True): new N/H/W recompile no more often than the same model with BatchNorm,
    and values and gradients match eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    frames = {}
    for kind in ("bn", "l2bn"):
        torch._dynamo.reset()
        model = ConvL2BN() if kind == "l2bn" else l2bn.convert_to_bn(ConvL2BN())
        eager = copy.deepcopy(model)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
        for n, h, w in ((4, 8, 8), (3, 10, 12), (5, 7, 9), (2, 6, 11)):
            want, got = gradients(eager, sample(n, h, w, seed=h)), gradients(model, sample(n, h, w, seed=h), compiled)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        frames[kind] = counter.frame_count
    assert frames["l2bn"] <= frames["bn"], frames


# --- fusion tools: what each does with L2BN (README "Tools to avoid") ------------------------------------

def test_fusion_tools_on_l2bn_as_documented():
    import copy as copy_

    from torch.fx.experimental.optimization import fuse as fx_fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = nn.Sequential(nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8) * torch.tensor([1.0, 50.0]).view(2, 1, 1, 1)
    with pytest.raises(AssertionError, match="did not find fuser method"):  # ao.quantization refuses
        torch.ao.quantization.fuse_modules(copy_.deepcopy(model), [["0", "1", "2"]])
    fused = fx_fuse(copy_.deepcopy(model))  # fx.optimization leaves L2BN unfused: same outputs
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None and m is not fused.get_submodule("0")
                   for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x))
    wrong = fuse_conv_bn_eval(model[0], model[1])  # folds it as BatchNorm: a different function
    assert (wrong(x) - model[1](model[0](x))).abs().max() > 1e-2
    # what can proceed: fuse Conv+ReLU pairs that have no L2BN between them; L2BN stays a float module
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), l2bn.L2BatchNorm2d(8)).eval()
    pairs = torch.ao.quantization.fuse_modules(copy_.deepcopy(net), [["0", "1"]])
    assert type(pairs[0]).__name__ == "ConvReLU2d" and type(pairs[2]) is l2bn.L2BatchNorm2d
    torch.testing.assert_close(pairs(x), net(x))
