"""The checks of torch's ``test_modules`` that apply to a norm layer, run on L2BatchNorm1d/2d/3d over the samples
``module_db`` gives nn.BatchNorm1d/2d/3d (torch's own ``module_inputs_func`` and error inputs, both dtypes, train
and eval). The forward reference is torch's BatchNorm, built from the same arguments, on sqrt(D)·x/‖x‖."""
from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("expecttest", reason="torch's module test data needs expecttest (the test extra)")
from torch.func import functional_call  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import l2bn  # noqa: E402
from l2bn.kernels.dispatch import IMPL_ENV_VAR  # noqa: E402

L2BN_OF = {nn.BatchNorm1d: l2bn.L2BatchNorm1d, nn.BatchNorm2d: l2bn.L2BatchNorm2d, nn.BatchNorm3d: l2bn.L2BatchNorm3d}
INFOS = [info for info in module_db if info.module_cls in L2BN_OF]


def _samples(info, dtype, training, requires_grad=False):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _cases() -> list:
    cases = []
    for info in INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                for index, sample in enumerate(_samples(info, dtype, training)):
                    name = f"{info.module_cls.__name__}-{sample.desc or 'default'}-{str(dtype)[6:]}-{'train' if training else 'eval'}"
                    cases.append(pytest.param(info, dtype, training, index, id=name))
    return cases


CASES = _cases()
F64_CASES = [case for case in CASES if case.values[1] == torch.float64]


def _build(info, dtype, training, index, requires_grad=False):
    """(L2BN layer, the same-argument BatchNorm, forward input) for one module_db sample."""
    sample = _samples(info, dtype, training, requires_grad)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    layer = L2BN_OF[info.module_cls](*args, **kwargs, dtype=dtype).train(training)
    bn = info.module_cls(*args, **kwargs, dtype=dtype).train(training)
    _randomise(layer)
    bn.load_state_dict(layer.state_dict())
    return layer, bn, sample.forward_input.args[0]


def _randomise(layer: nn.Module) -> None:
    """Non-default parameters and statistics, so a swapped or ignored one shows."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.copy_(noise + 0.5 if name in ("weight", "running_var") else noise - 0.5)


def l2_normalised(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (F.normalize(flat, dim=1, eps=1e-12) * math.sqrt(flat.shape[1])).view_as(x)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_forward_is_batchnorm_of_the_l2_normalised_input(info, dtype, training, index):
    layer, bn, x = _build(info, dtype, training, index)
    torch.testing.assert_close(layer(x), bn(l2_normalised(x)))
    torch.testing.assert_close(_state(layer), _state(bn))  # running statistics and the batch counter


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_repr_is_batchnorms_plus_the_l2_options(info, dtype, training, index):
    layer, bn, _ = _build(info, dtype, training, index)
    assert repr(layer) == f"L2{repr(bn)[:-1]}, rescale=True, l2_eps=1e-12)"


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_state_dict_round_trips_through_batchnorm_and_a_file(info, dtype, training, index):
    layer, bn, x = _build(info, dtype, training, index)
    bn.load_state_dict(layer.state_dict(), strict=True)
    fresh = L2BN_OF[info.module_cls](*_samples(info, dtype, training)[index].constructor_input.args,
                                     **_samples(info, dtype, training)[index].constructor_input.kwargs, dtype=dtype)
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    fresh.train(training)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_pickle_and_deepcopy_give_the_same_layer(info, dtype, training, index):
    layer, _, x = _build(info, dtype, training, index)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
        assert type(copied) is type(layer) and copied.training == training
        torch.testing.assert_close(copied(x), copy.deepcopy(layer)(x), rtol=0, atol=0)


def _as_function(layer: nn.Module, x: torch.Tensor):
    """(f, inputs) for gradcheck: the layer's output as a function of its input and parameters."""
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *params):
        return functional_call(layer, (dict(zip(names, params)), dict(layer.named_buffers())), (x,))

    return f, (x, *params)


@pytest.mark.parametrize("info, dtype, training, index", F64_CASES)
def test_gradcheck_with_torchs_defaults(info, dtype, training, index):
    """torch's test_grad: batched gradients included, on the default path."""
    layer, _, x = _build(info, dtype, training, index, requires_grad=True)
    f, inputs = _as_function(layer, x)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.slow  # 44 double-backward checks: minutes on 2 cores; the reference path's own tests cover it fast
@pytest.mark.parametrize("info, dtype, training, index", F64_CASES)
def test_gradgradcheck_on_the_reference_path(info, dtype, training, index, monkeypatch):
    """torch's test_gradgrad; the fast paths have no double backward (README), the reference has."""
    monkeypatch.setenv(IMPL_ENV_VAR, "reference")
    layer, _, x = _build(info, dtype, training, index, requires_grad=True)
    f, inputs = _as_function(layer, x)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_factory_kwargs_and_meta_init(info, dtype, training, index):
    """torch's test_factory_kwargs / test_to_empty: device and dtype reach every parameter and float buffer."""
    sample = _samples(info, dtype, training)[index].constructor_input
    layer = L2BN_OF[info.module_cls](*sample.args, **sample.kwargs, device="meta", dtype=dtype)
    for tensor in [*layer.parameters(), *layer.buffers()]:
        assert tensor.is_meta and tensor.dtype == (torch.long if not tensor.is_floating_point() else dtype)
    layer.to_empty(device="cpu").reset_parameters()
    want = info.module_cls(*sample.args, **sample.kwargs, dtype=dtype)
    torch.testing.assert_close(_state(layer), _state(want), rtol=0, atol=0)


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_dtype_moves(info, dtype, training, index):
    layer, _, x = _build(info, dtype, training, index)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    moved = copy.deepcopy(layer).to(other)
    assert all(p.dtype == other for p in moved.parameters())
    if layer.num_batches_tracked is not None:
        assert moved.num_batches_tracked.dtype == torch.long
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(moved(x.to(other)), layer(x).to(other), **tolerance)
    torch.testing.assert_close(_state(moved.to(dtype)), _state(layer), **tolerance)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with every stride doubled in the last dimension (as torch's module tests do)."""
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert t.numel() == 0 or t.dim() == 0 or not wide.is_contiguous() or t.shape[-1] == 1
    return wide.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("info, dtype, training, index", CASES)
def test_non_contiguous_input_and_output_gradient(info, dtype, training, index):
    layer, _, x = _build(info, dtype, training, index, requires_grad=True)
    y = copy.deepcopy(layer)(x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x2 = _non_contiguous(x)
    y2 = copy.deepcopy(layer)(x2)
    (dx2,) = torch.autograd.grad(y2, x2, _non_contiguous(dy))
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(dx2, dx)


@pytest.mark.parametrize("info, dtype, training, index",
                         [case for case in CASES if case.values[0].module_cls is not nn.BatchNorm1d])
def test_channels_last_input(info, dtype, training, index):
    """torch's test_memory_format: the output equals the contiguous one and keeps the input's layout."""
    layer, _, x = _build(info, dtype, training, index)
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    y = copy.deepcopy(layer)(x.to(memory_format=layout))
    torch.testing.assert_close(y, copy.deepcopy(layer)(x))
    assert x.numel() == 0 or y.is_contiguous(memory_format=layout)


ERROR_CASES = [
    pytest.param(info, dtype, training, index, id=f"{info.module_cls.__name__}-{str(dtype)[6:]}-{index}")
    for info in INFOS for dtype in info.dtypes for training in (True, False)
    for index, _ in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                            training=training))
]


def _outcome(cls, args, kwargs, dtype, training, x) -> tuple[type, str] | None:
    try:
        cls(*args, **kwargs, dtype=dtype).train(training)(x)
    except Exception as error:  # noqa: BLE001 - the outcome itself is compared
        return type(error), str(error)
    return None


@pytest.mark.parametrize("info, dtype, training, index", ERROR_CASES)
def test_errors_like_batchnorm(info, dtype, training, index):
    """The error samples raise what module_db expects in training; in both modes L2BN fails where, and as,
    BatchNorm does (eval accepts eps=0 and says "non-negative" for eps<0, as torch's BatchNorm)."""
    error = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=training)[index]
    assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
    sample = error.module_error_input
    args, kwargs, x = sample.constructor_input.args, sample.constructor_input.kwargs, sample.forward_input.args[0]
    got = _outcome(L2BN_OF[info.module_cls], args, kwargs, dtype, training, x)
    assert got == _outcome(info.module_cls, args, kwargs, dtype, training, x)
    if training:
        assert got is not None and got[0] is error.error_type and re.search(error.error_regex, got[1])
