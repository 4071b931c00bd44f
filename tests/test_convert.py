"""BatchNorm ↔ L2BN conversion keeps state, mode, device and dtype, and round-trips."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import l2bn
from l2bn.layers import _L2BatchNorm


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def test_resnet18_conversion_leaves_no_plain_bn_and_runs():
    model = torchvision.models.resnet18(num_classes=10)
    bn_count = _count(model, nn.BatchNorm2d)
    model.layer1[0].bn1.running_mean.uniform_()
    model.layer1[0].bn1.num_batches_tracked.fill_(7)
    expected_mean = model.layer1[0].bn1.running_mean.clone()
    converted = l2bn.convert_to_l2bn(model)
    assert converted is model
    assert _count(model, nn.BatchNorm2d) == 0
    assert _count(model, l2bn.L2BatchNorm2d) == bn_count
    assert torch.equal(model.layer1[0].bn1.running_mean, expected_mean)
    assert int(model.layer1[0].bn1.num_batches_tracked) == 7
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_include_predicate_on_qualified_names():
    model = torchvision.models.resnet18(num_classes=10)
    names = []
    l2bn.convert_to_l2bn(model, include=lambda name: names.append(name) or name.startswith("layer1."))
    assert "layer1.0.bn1" in names and "bn1" in names
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert isinstance(module, _L2BatchNorm) == name.startswith("layer1."), name


def test_round_trip_keeps_state_mode_dtype_and_grad_flags():
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm3d(3)), nn.BatchNorm2d(4))
    model = model.double()
    model[1].weight.requires_grad_(False)
    model[3].eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l2bn.convert_to_l2bn(model)
    assert type(model[1]) is l2bn.L2BatchNorm1d
    assert type(model[2][0]) is l2bn.L2BatchNorm3d
    assert type(model[3]) is l2bn.L2BatchNorm2d
    assert model[1].weight.dtype == torch.float64 and not model[1].weight.requires_grad
    assert model[1].training and not model[3].training
    l2bn.convert_to_bn(model)
    assert [type(m) for m in (model[1], model[2][0], model[3])] == [nn.BatchNorm1d, nn.BatchNorm3d, nn.BatchNorm2d]
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_root_module_conversion_returns_new_module():
    bn = nn.BatchNorm2d(3, eps=1e-3, momentum=None, affine=False)
    layer = l2bn.convert_to_l2bn(bn, rescale=False)
    assert type(layer) is l2bn.L2BatchNorm2d
    assert (layer.eps, layer.momentum, layer.affine, layer.rescale) == (1e-3, None, False, False)


def test_torch_sync_converter_would_drop_l2bn():
    """Why we ship our own converters: torch's treats every _BatchNorm subclass as plain BN."""
    model = l2bn.convert_to_l2bn(nn.Sequential(nn.BatchNorm2d(3)))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[0]) is nn.SyncBatchNorm


def test_sync_batchnorm_converts_to_sync_l2bn_and_back():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, eps=1e-3, momentum=0.3))
    with torch.no_grad():
        model[1].running_mean.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l2bn.convert_to_l2bn(model)
    assert type(model[1]) is l2bn.SyncL2BatchNorm and (model[1].eps, model[1].momentum) == (1e-3, 0.3)
    l2bn.convert_to_bn(model)
    assert type(model[1]) is nn.SyncBatchNorm
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.needs_batchnorm_bias
def test_bias_false_round_trips():
    model = nn.Sequential(nn.BatchNorm2d(4, bias=False), nn.BatchNorm1d(3, bias=False))
    l2bn.convert_to_l2bn(model)
    assert model[0].bias is None and model[1].bias is None and model[0].weight is not None
    l2bn.convert_to_bn(model)
    assert type(model[0]) is nn.BatchNorm2d and model[0].bias is None


def test_lazy_batchnorm_converts_once_initialised_and_warns_by_name_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning, match=r"'1' \(LazyBatchNorm2d is not initialised yet: run one forward pass first\)"):
        l2bn.convert_to_l2bn(model)
    model(torch.randn(2, 3, 4, 4))  # materialises: it becomes a BatchNorm2d
    l2bn.convert_to_l2bn(model)
    assert type(model[1]) is l2bn.L2BatchNorm2d and model[1].num_features == 4


def test_unknown_batchnorm_subclass_is_named_in_a_warning():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(MyBatchNorm(3)))
    with pytest.warns(UserWarning, match=r"left 1 BatchNorm layer\(s\) unconverted: '1.0' \(MyBatchNorm is a BatchNorm subclass"):
        l2bn.convert_to_l2bn(model)
    assert type(model[0]) is l2bn.L2BatchNorm2d and type(model[1][0]) is MyBatchNorm


def test_composite_zoo_norms_keep_their_inner_batchnorm_without_warning():
    model = nn.Sequential(l2bn.norms.get_norm_layer("lnbn")(4), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l2bn.convert_to_l2bn(model)
    assert type(model[1]) is l2bn.L2BatchNorm2d


def test_swap_modules_replaces_by_qualified_name_and_the_root():
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.ReLU(), nn.Tanh()))
    seen = []
    swapped = l2bn.swap_modules(model, lambda name, m: seen.append(name) or (nn.GELU() if isinstance(m, nn.ReLU) else None))
    assert seen == ["", "0", "1", "1.0", "1.1"]
    assert [type(m) for m in (swapped[0], swapped[1][0], swapped[1][1])] == [nn.GELU, nn.GELU, nn.Tanh]
    assert type(l2bn.swap_modules(nn.ReLU(), lambda name, m: nn.Tanh())) is nn.Tanh


def test_fuse_conv_bn_eval_would_fold_l2bn_wrongly():
    """Why README lists it among the tools to avoid: fusion treats L2BN as BN, and the result is wrong."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, norm = nn.Conv2d(3, 4, 3).eval(), l2bn.L2BatchNorm2d(4).eval()
    x = torch.randn(2, 3, 8, 8) * torch.tensor([1.0, 9.0]).view(2, 1, 1, 1)
    fused = fuse_conv_bn_eval(conv, norm)
    assert not torch.allclose(fused(x), norm(conv(x)), rtol=1e-2, atol=1e-2)
    folded = fuse_conv_bn_eval(conv, l2bn.convert_to_bn(norm))  # what fusion really computes: plain BN
    torch.testing.assert_close(fused(x), folded(x))
