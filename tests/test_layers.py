"""L2BatchNorm{1,2,3}d against an independent float64 formula, and BatchNorm compatibility."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import l2bn
from l2bn.functional import l2_batch_norm
from l2bn.kernels import cpp

LAYERS = {2: l2bn.L2BatchNorm1d, 3: l2bn.L2BatchNorm1d, 4: l2bn.L2BatchNorm2d, 5: l2bn.L2BatchNorm3d}
SHAPES = [(6, 3), (6, 3, 7), (5, 3, 4, 6), (4, 3, 2, 3, 4)]
NO_COMPILER = pytest.mark.skipif(not cpp.compiler_found(), reason="no C++ compiler: the compiled kernel cannot be built")
IMPLS = [pytest.param("cpp", marks=NO_COMPILER), "fused", "reference"]


def expected(x, running_mean, running_var, weight, bias, training, momentum, eps=1e-5, rescale=True):
    """The paper's eq. (3) written out: x_n · sqrt(D) / ‖x_n‖ over all non-batch dims, then F.batch_norm."""
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    scaled = F.normalize(flat, dim=1, eps=1e-12) * (math.sqrt(d) if rescale else 1.0)
    return F.batch_norm(scaled.reshape(x.shape), running_mean, running_var, weight, bias, training, momentum, eps)


def make_input(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # uneven per-sample scales and a channel offset: the l2 step and BN both have something to do
    scales = torch.rand(shape[0], generator=g, dtype=dtype) * 5 + 0.1
    x = torch.randn(shape, generator=g, dtype=dtype) + 0.7
    return x * scales.view(-1, *[1] * (len(shape) - 1))


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    monkeypatch.setenv("L2BN_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_training_forward_backward_and_running_stats(shape, impl):
    layer = LAYERS[len(shape)](shape[1], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    running_mean, running_var = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    for step in range(3):
        x = make_input(shape, seed=step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = layer(x)
        y_ref = expected(x_ref, running_mean, running_var, weight, bias, True, 0.1)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-9, atol=1e-10)
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_eval_uses_running_stats_and_keeps_l2_step(shape, impl):
    layer = LAYERS[len(shape)](shape[1], dtype=torch.float64)
    layer(make_input(shape, seed=1))
    layer.eval()
    x = make_input(shape, seed=2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = expected(x_ref, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    # the per-sample step applies in eval: rescaling one sample does not change its output
    x2 = x.detach().clone()
    x2[0] *= 17.0
    torch.testing.assert_close(layer(x2)[0], y[0].detach())


def test_momentum_none_is_cumulative_average(impl):
    layer = l2bn.L2BatchNorm2d(3, momentum=None, dtype=torch.float64)
    batches = [make_input((4, 3, 3, 3), seed=s) for s in range(4)]
    for x in batches:
        layer(x)
    means, vars_ = [], []
    for x in batches:
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        expected(x, rm, rv, None, None, True, 1.0)  # momentum 1: running stats = this batch's stats
        means.append(rm)
        vars_.append(rv)
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack(vars_).mean(0))


def test_track_running_stats_false_uses_batch_stats_in_eval(impl):
    layer = l2bn.L2BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    assert layer.running_mean is None
    x = make_input((4, 3, 5, 5))
    torch.testing.assert_close(layer(x), expected(x, None, None, layer.weight, layer.bias, True, 0.1))


def test_no_rescale_matches_plain_l2_normalisation(impl):
    layer = l2bn.L2BatchNorm2d(3, rescale=False, eps=1e-12, dtype=torch.float64)
    x = make_input((4, 3, 5, 5))
    torch.testing.assert_close(
        layer(x), expected(x, None, None, layer.weight, layer.bias, True, 0.1, eps=1e-12, rescale=False)
    )


def test_rescale_keeps_bn_standardising():
    """Without sqrt(D), x̂ has mean square 1/D ≪ eps and BN no longer standardises (DESIGN.md)."""
    x = make_input((2, 256, 32, 32))  # D = 262144: 1/D ≈ 3.8e-6 < eps = 1e-5
    y = l2bn.L2BatchNorm2d(256, dtype=torch.float64)(x)
    y_no = l2bn.L2BatchNorm2d(256, rescale=False, dtype=torch.float64)(x)
    assert y.var(dim=(0, 2, 3), unbiased=False).mean().item() == pytest.approx(1.0, rel=1e-3)
    assert y_no.var(dim=(0, 2, 3), unbiased=False).mean().item() < 0.5


@pytest.mark.parametrize("impl_name", IMPLS)
def test_gradcheck(impl_name):
    x = make_input((3, 2, 3, 2)).requires_grad_()
    weight = torch.rand(2, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def train_fn(x, w, b):
        return l2_batch_norm(x, None, None, w, b, True, impl=impl_name)

    rm, rv = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def eval_fn(x, w, b):
        return l2_batch_norm(x, rm, rv, w, b, False, impl=impl_name)

    assert torch.autograd.gradcheck(train_fn, (x, weight, bias))
    assert torch.autograd.gradcheck(eval_fn, (x, weight, bias))


def test_state_dict_loads_strictly_both_ways():
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3))
    layer = l2bn.L2BatchNorm2d(5)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert layer.state_dict().keys() == bn.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(layer.state_dict(), strict=True)
    assert int(back.num_batches_tracked) == 1


def test_constructor_matches_batchnorm():
    layer = l2bn.L2BatchNorm1d(7, 1e-3, 0.2, False, False, device="cpu", dtype=torch.float64, rescale=False, l2_eps=1e-6)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.2, False, False)
    assert layer.weight is None and layer.running_mean is None
    assert (layer.rescale, layer.l2_eps) == (False, 1e-6)
    assert "rescale=False" in repr(layer)
    with pytest.raises(TypeError):
        l2bn.L2BatchNorm2d(3, 1e-5, 0.1, True, True, None, None, False)  # rescale is keyword-only


def test_one_value_per_channel_error_matches_batchnorm():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        l2bn.L2BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        l2bn.L2BatchNorm1d(3)(torch.randn(1, 3))
    l2bn.L2BatchNorm2d(3).eval()(torch.randn(1, 3, 1, 1))  # fine in eval, like BatchNorm


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (l2bn.L2BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input"),
        (l2bn.L2BatchNorm2d, (2, 3, 4), "expected 4D input"),
        (l2bn.L2BatchNorm3d, (2, 3, 4, 4), "expected 5D input"),
    ],
)
def test_wrong_rank_errors(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer(3)(torch.randn(shape))


def test_channel_mismatch_error():
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        l2bn.L2BatchNorm2d(3)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
def test_each_channel_tensor_is_checked(wrong):
    tensors = {"running_mean": torch.zeros(4), "running_var": torch.ones(4), "weight": torch.ones(4),
               "bias": torch.zeros(4)}
    tensors[wrong] = tensors[wrong][:3]
    with pytest.raises(RuntimeError, match=f"{wrong} should contain 4 elements not 3"):
        l2_batch_norm(torch.randn(2, 4, 3, 3), training=True, **tensors)
    tensors[wrong] = torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"mixed dtype: input is torch.float32 but {wrong} is torch.float64"):
        l2_batch_norm(torch.randn(2, 4, 3, 3), training=True, **tensors)


def test_parametrized_weight_is_the_one_used(impl):
    """The layer reads its tensors from its parameter and buffer tables where they are there (per-call cost); a
    parametrization moves the weight out of them, behind a property, and must still be what the layer uses."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    layer = l2bn.L2BatchNorm2d(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
    parametrize.register_parametrization(layer, "weight", Doubled())
    x = make_input((5, 3, 4, 6))
    y = layer(x)
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    want = expected(x, None, None, weight, layer.bias.detach(), True, 0.1)
    torch.testing.assert_close(y, want)
    y.pow(2).sum().backward()
    assert layer.parametrizations.weight.original.grad.abs().sum() > 0


def test_bad_impl_name_lists_choices():
    with pytest.raises(ValueError, match="'fused', 'reference'"):
        l2_batch_norm(torch.randn(2, 3), None, None, training=True, impl="cuda-magic")


def test_all_zero_sample_is_finite(impl):
    x = make_input((4, 3, 5, 5)).requires_grad_()
    with torch.no_grad():
        x[1].zero_()
    layer = l2bn.L2BatchNorm2d(3, dtype=torch.float64)
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all()
    layer.eval()
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_does_not_overflow(dtype, impl):
    x64 = torch.randn(4, 64, 56, 56, dtype=torch.float64) * 30
    layer = l2bn.L2BatchNorm2d(64)
    y = layer(x64.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y_ref = expected(x64, None, None, None, None, True, 0.1)
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


def test_float64_keeps_precision():
    # tiny relative perturbations are visible only if nothing is computed in float32
    x = make_input((4, 3, 5, 5))
    y = l2bn.L2BatchNorm2d(3, dtype=torch.float64)(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected(x, None, None, None, None, True, 0.1), rtol=1e-13, atol=1e-13)


def test_channels_last_values_and_format(impl):
    x = make_input((4, 3, 5, 6))
    layer = l2bn.L2BatchNorm2d(3, dtype=torch.float64)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    y_cl = layer(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, expected(x, None, None, layer.weight, layer.bias, True, 0.1))
    y_cl.sum().backward()
    assert torch.isfinite(x_cl.grad).all()


def test_autocast_bf16():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm2d(8))
    x = torch.randn(4, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    y32 = model(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.1, atol=0.1)
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_deepcopy_and_pickle_keep_state():
    layer = l2bn.L2BatchNorm2d(3, rescale=False)
    layer(torch.randn(4, 3, 2, 2))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone, l2bn.L2BatchNorm2d) and clone.rescale is False
        torch.testing.assert_close(clone.running_mean, layer.running_mean)
        x = torch.randn(4, 3, 2, 2)
        torch.testing.assert_close(clone.eval()(x), layer.eval()(x))
        layer.train()


def test_torch_compile_fullgraph():
    layer = l2bn.L2BatchNorm2d(4, dtype=torch.float64)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for mode in (True, False):
        layer.train(mode)
        eager.train(mode)
        x = make_input((3, 4, 5, 5)).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = compiled(x), eager(x2)
        torch.testing.assert_close(y, y2)
        y.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.running_mean, eager.running_mean)


def test_torch_export_eval():
    layer = l2bn.L2BatchNorm2d(4)
    layer(torch.randn(8, 4, 5, 5))
    layer.eval()
    exported = torch.export.export(layer, (torch.randn(3, 4, 5, 5),))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(exported.module()(x), layer(x))


@pytest.mark.parametrize("training", [True, False])
def test_input_gradient_is_orthogonal_to_each_sample(training, impl):
    """y depends on x_n only through x_n/‖x_n‖, so Σ dx_n·x_n = 0 for every sample."""
    layer = l2bn.L2BatchNorm2d(3, dtype=torch.float64).train(training)
    layer.running_var.fill_(2.0)
    x = make_input((4, 3, 5, 5)).requires_grad_()
    y = layer(x)
    (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
    dots = (grad * x).sum(dim=(1, 2, 3))
    assert dots.abs().max() < 1e-12 * grad.abs().max() * x.abs().max() * x[0].numel()


@pytest.mark.parametrize("training", [True, False])
def test_output_accepts_inplace_activation(training, impl):
    """Models apply ReLU(inplace=True) to norm outputs: the output must not be a view of a custom Function."""
    layer = l2bn.L2BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = torch.relu_(layer(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_torch_export_train_mode_updates_running_stats():
    layer = l2bn.L2BatchNorm2d(4, dtype=torch.float64)
    eager = copy.deepcopy(layer)
    exported = torch.export.export(layer, (make_input((3, 4, 5, 5)),)).module()
    x = make_input((3, 4, 5, 5), seed=3)
    torch.testing.assert_close(exported(x), eager(x))
    torch.testing.assert_close(exported.running_mean, eager.running_mean)
    torch.testing.assert_close(exported.running_var, eager.running_var)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_path_matches_autograd_path(training, channels_last, impl):
    """Without a graph to build the fused path skips its autograd.Function; same values, same format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = l2bn.L2BatchNorm2d(3, dtype=torch.float64).train(training)
    layer.running_var.fill_(1.7)
    reference_layer = copy.deepcopy(layer)
    x = make_input((4, 3, 5, 6)).to(memory_format=fmt)
    with torch.no_grad():
        y = layer(x)
        torch.relu_(y)  # in-place activations must work on the inference output too
    expected_y = torch.relu(reference_layer(x.clone().requires_grad_()))
    torch.testing.assert_close(y, expected_y.detach())
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(layer.running_mean, reference_layer.running_mean)
    torch.testing.assert_close(layer.running_var, reference_layer.running_var)


@pytest.mark.parametrize("bad", [-1e-12, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_l2_eps_negative_nan_or_infinite_is_refused_naming_the_value(bad):
    pattern = f"l2_eps must be a finite number >= 0.*got {bad!r}"
    with pytest.raises(ValueError, match=pattern):
        l2bn.L2BatchNorm2d(3, l2_eps=bad)
    with pytest.raises(ValueError, match=pattern):
        l2bn.FrozenL2BatchNorm2d(3, l2_eps=bad)
    with pytest.raises(ValueError, match=pattern):
        l2_batch_norm(make_input((4, 3, 2, 2)), None, None, training=True, l2_eps=bad)


def test_l2_eps_zero_is_accepted():
    x = make_input((4, 3, 2, 2))
    torch.testing.assert_close(l2bn.L2BatchNorm2d(3, l2_eps=0.0, dtype=torch.float64)(x),
                               expected(x, None, None, None, None, True, 0.1))
