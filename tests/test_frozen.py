"""Frozen L2BN: torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d convert to it and back."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import l2bn

F64 = torch.float64


def frozen_formula(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Independent float64 frozen L2BN: sqrt(D)·x_n/‖x_n‖, then the stored statistics and affine."""
    x = x.double()
    d = x[0].numel()
    x_hat = math.sqrt(d) * x / x.flatten(1).norm(dim=1).clamp_min(layer.l2_eps).view(-1, 1, 1, 1)
    view = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    return view(layer.weight) * (x_hat - view(layer.running_mean)) / (view(layer.running_var) + layer.eps).sqrt() + view(layer.bias)


def _randomise(module: nn.Module) -> None:
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            buf.copy_(torch.rand_like(buf) + 0.5 if name.endswith("running_var") else torch.randn_like(buf))


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def test_frozen_layer_matches_the_formula_in_train_and_eval_and_passes_only_input_grads():
    layer = l2bn.FrozenL2BatchNorm2d(5, eps=1e-3, dtype=F64)
    _randomise(layer)
    x = (torch.randn(4, 5, 3, 3, dtype=F64) * torch.tensor([1e-3, 1.0, 10.0, 1e4], dtype=F64).view(4, 1, 1, 1))
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), frozen_formula(x, layer))
    assert not list(layer.parameters())
    x.requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


def test_state_dict_is_torchvisions_and_round_trips():
    tv = FrozenBatchNorm2d(6, eps=1e-3)
    _randomise(tv)
    model = l2bn.convert_to_l2bn(nn.Sequential(tv))
    frozen = model[0]
    assert type(frozen) is l2bn.FrozenL2BatchNorm2d and frozen.eps == 1e-3
    assert set(frozen.state_dict()) == set(tv.state_dict())
    for key, value in tv.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], value)
    frozen.load_state_dict(nn.BatchNorm2d(6).state_dict())  # num_batches_tracked dropped, as torchvision does
    back = l2bn.convert_to_bn(model)[0]
    assert type(back) is FrozenBatchNorm2d and back.eps == 1e-3


def test_detection_model_with_frozen_backbone_converts_fully_and_matches_the_formula():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96).eval()
    count = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert count > 0
    _randomise(model.backbone)
    model, caught = _warnings_of(lambda: l2bn.convert_to_l2bn(model))
    assert not caught
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, l2bn.FrozenL2BatchNorm2d) for m in model.modules()) == count
    assert l2bn.convert.unconverted_batchnorms(model) == []
    body = model.backbone.body
    x = torch.randn(2, 3, 64, 64)
    stem = body.relu(body.bn1(body.conv1(x)))
    torch.testing.assert_close(body.bn1(body.conv1(x)).double(), frozen_formula(body.conv1(x), body.bn1),
                               rtol=1e-5, atol=1e-5)
    assert torch.isfinite(stem).all()
    with torch.no_grad():
        detections = model([torch.rand(3, 96, 96)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
    model.train()
    losses = model([torch.rand(3, 96, 96)], [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]),
                                               "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert body.layer4[0].conv1.weight.grad is not None


def test_unknown_layer_with_batchnorm_statistics_is_named_in_a_warning():
    class MyFrozenBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

    _, caught = _warnings_of(lambda: l2bn.convert_to_l2bn(nn.Sequential(MyFrozenBN())))
    assert any("'0' (MyFrozenBN keeps BatchNorm statistics" in message for message in caught), caught


def test_timm_frozen_norm_act_converts_keeping_drop_and_act_and_back():
    timm = pytest.importorskip("timm")
    from l2bn.norm_act import FrozenL2BatchNormAct2d

    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    timm.layers.freeze_batch_norm_2d(model)  # timm's freeze helper: BatchNorm2d -> FrozenBatchNorm2d
    l2bn.convert_to_l2bn(model)
    assert not l2bn.convert.unconverted_batchnorms(model)
    assert isinstance(model.bn1, l2bn.FrozenL2BatchNorm2d)

    act = timm.layers.FrozenBatchNormAct2d(4, act_layer=nn.SiLU)
    _randomise(act)
    converted = l2bn.convert_to_l2bn(nn.Sequential(act))[0]
    assert type(converted) is FrozenL2BatchNormAct2d and converted.act is act.act
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(converted(x).double(), torch.nn.functional.silu(frozen_formula(x, converted)),
                               rtol=1e-5, atol=1e-5)
    back = l2bn.convert_to_bn(nn.Sequential(converted))[0]
    assert type(back) is timm.layers.FrozenBatchNormAct2d and back.act is act.act
    torch.testing.assert_close(back(x), act(x))
