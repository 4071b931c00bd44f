"""BatchNorm ↔ L2BN conversion keeps state, mode, device and dtype, and round-trips."""
from __future__ import annotations

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
