"""Acoustic scene CNNs: reference parameter counts, shapes, TF padding, attention, and L2BN in every norm."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from l2bn import L2BatchNorm2d
from l2bn.models import NormRecorder, asc, create_model, get_model_entry, list_models
from l2bn.norms import list_norms

# Trainable parameters of the Keras reference models (issue 12; Keras's summary of the same layers).
REFERENCE_PARAMS = {"asc_resnet17": 12_966_444, "fcnn": 11_780_329, "fsfcnn": 16_531_913}
# norm positions (all, affine): ResNet 2 paths × (stem + 8 blocks × 2) + 3 head; FCNN 1 + 8 + 2; fsFCNN 1 + 10 + 2
NORMS = {"asc_resnet17": (37, 2), "fcnn": (11, 9), "fsfcnn": (13, 11)}


def _norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))]


def _conv_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_registered_as_asc_family():
    assert list_models("asc") == ["asc_resnet17", "fcnn", "fsfcnn"]
    assert all(get_model_entry(n).kind == "asc" for n in REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    model = create_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(count - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.005
    assert count == REFERENCE_PARAMS[name]  # the same layers give the same count exactly
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet17_parameter_count_by_formula():
    # per path: affine input norm (2·3) + 3×3 stem 3→48 + stacks; head 1×1 384→1536 and 1536→10
    widths, path = (48, 96, 192, 384), 2 * 3 + 9 * 3 * 48
    cin = 48
    for w in widths:
        path += 9 * (cin * w + w * w) + 9 * 2 * w * w  # block 1 (maybe widening) + block 2
        cin = w
    assert _conv_params(create_model("asc_resnet17", num_classes=7)) + 6 * 2 == 2 * path + 384 * 1536 + 1536 * 7


SMALL = {"asc_resnet17": (4, 8, 8, 16), "fcnn": (8, 8, 16), "fsfcnn": (4, 8, 8, 16)}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
@pytest.mark.parametrize("frames,small", [(32, False), (45, True), (423, True)])
def test_output_shape_any_length(name, frames, small):
    model = create_model(name, num_classes=10, **({"widths": SMALL[name]} if small else {})).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, frames))
        features = model.forward_features(torch.randn(1, 3, 128, frames))
    assert out.shape == (1, 10) and features.shape == (1, 10, 1, 1)
    assert model.feature_layer == "pooled" and isinstance(model.pooled, nn.Flatten)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_every_norm_is_l2bn_with_keras_defaults(name):
    model = create_model(name, num_classes=10, norm_layer="l2bn")
    norms = _norms(model)
    total, affine = NORMS[name]
    assert len(norms) == total and all(type(m) is L2BatchNorm2d for _, m in norms)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())  # no plain BatchNorm anywhere
    assert sum(m.affine for _, m in norms) == affine
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for _, m in norms)
    assert not dict(norms)["final_norm"].affine


def test_l2bn_really_runs_per_sample_scale_is_removed():
    # L2BN's first step removes each sample's scale; BN's batch statistics do not. (The Keras port's L2BN
    # subclass defined a forward() Keras never called, so its "L2BN" ran as BN: this would catch that.)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 40)
    scaled = x.clone()
    scaled[0] *= 50.0
    for norm, same in (("l2bn", True), ("bn", False)):
        torch.manual_seed(1)
        model = create_model("fcnn", num_classes=10, norm_layer=norm, dropout=0.0, widths=(8, 16, 32)).train()
        a, b = model(x), model(scaled)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5) is same, norm


def test_all_but_last_keeps_the_final_norm_as_bn():
    model = create_model("fsfcnn", num_classes=10, norm_layer="l2bn", placement="all-but-last", widths=(4, 8, 8, 16))
    plain = [n for n, m in _norms(model) if type(m) is nn.BatchNorm2d]
    assert plain == ["final_norm"]
    final = model.final_norm
    assert (final.affine, final.eps, final.momentum) == (False, 1e-3, 0.01)
    assert all(type(m) is L2BatchNorm2d and m.eps == 1e-3 for n, m in _norms(model) if n != "final_norm")
    # the head's parameter-free norm keeps affine=False through the swap
    assert not model.head[1].affine and type(model.head[1]) is L2BatchNorm2d


def test_placement_parts_select_stacks_of_both_paths():
    model = create_model("asc_resnet17", num_classes=10, norm_layer="l2bn", placement="stage2", widths=(4, 8, 16, 32))
    swapped = {n for n, m in _norms(model) if type(m) is L2BatchNorm2d}
    assert swapped == {n for n, _ in _norms(model) if ".stage2." in n} and len(swapped) == 2 * 4
    parts = asc.asc_parts(model)
    assert set(parts) == {"stem", "stage1", "stage2", "stage3", "stage4", "head", "last", "all-but-last"}
    with pytest.raises(ValueError, match="unknown placement"):
        create_model("fcnn", num_classes=10, placement="stage9")


def test_non_affine_positions_need_an_affine_keyword():
    def no_affine(num_features):
        return nn.BatchNorm2d(num_features)

    with pytest.raises(ValueError, match="affine=False"):
        create_model("fcnn", num_classes=10, norm_layer=no_affine)


def test_resnet17_needs_even_mel_bins():
    with pytest.raises(ValueError, match="even number"):
        create_model("asc_resnet17", num_classes=10, widths=(4, 8, 16, 32))(torch.randn(1, 3, 127, 40))


@pytest.mark.parametrize("size,kernel,stride,expected", [(400, 3, 2, (0, 1)), (401, 3, 2, (1, 1)), (64, 3, 1, (1, 1)),
                                                          (400, 5, 2, (1, 2)), (7, 3, 2, (1, 1))])
def test_tensorflow_same_padding(size, kernel, stride, expected):
    assert asc._same_pad(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


def test_same_pools_follow_tensorflow():
    x = torch.arange(2 * 8 * 6, dtype=torch.float64).reshape(1, 2, 8, 6)
    avg = asc.SamePool2d("avg", 3, (1, 2))(x)
    assert avg.shape == (1, 2, 8, 3)
    # output (i, j) averages rows i-1..i+1 and columns 2j..2j+2 that exist (TF excludes the padding)
    for i in range(8):
        for j in range(3):
            window = x[0, :, max(i - 1, 0) : i + 2, 2 * j : min(2 * j + 3, 6)]
            assert torch.allclose(avg[0, :, i, j], window.mean((1, 2)))
    mx = asc.SamePool2d("max", 3, (2, 2))(-x)  # negative values: -inf padding must never win
    assert mx.shape == (1, 2, 4, 3)
    assert torch.equal(mx[0, :, 0, 0], (-x)[0, :, 0:2, 0:2].amax((1, 2)))


def test_channel_attention_formula():
    torch.manual_seed(0)
    att = asc.ChannelAttention(10, ratio=2).double()
    x = torch.randn(3, 10, 4, 5, dtype=torch.float64)
    w1, b1, w2, b2 = att.fc1.weight, att.fc1.bias, att.fc2.weight, att.fc2.bias

    def mlp(v):
        return torch.relu(v @ w1.T + b1) @ w2.T + b2

    avg, mx = x.reshape(3, 10, -1).mean(-1), x.reshape(3, 10, -1).max(-1).values
    expected = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    assert torch.allclose(att(x), expected)
    assert att.fc1.out_features == 5 and sum(p.numel() for p in att.parameters()) == 10 * 5 + 5 + 5 * 10 + 10


def test_he_normal_init_and_recorded_norms():
    recorder = NormRecorder(nn.BatchNorm2d)
    model = asc.fcnn(norm_layer=recorder)
    assert len(recorder.created) == NORMS["fcnn"][0]
    conv = model.block3[0]
    std = math.sqrt(2.0 / conv.weight[0].numel())
    assert conv.weight.abs().max() <= 2 * std + 1e-7 and abs(conv.weight.std().item() - 0.88 * std) < 0.05 * std


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_angle_features_are_the_pooled_class_maps(name):
    from l2bn.metrics import FeatureHook

    model = create_model(name, num_classes=10, widths=SMALL[name]).eval()
    x = torch.randn(3, 3, 32, 40)
    with FeatureHook(model) as hook, torch.no_grad():
        logits = model(x)
    assert hook.layer_name == "pooled" and hook.features.shape == (3, 10)
    assert torch.equal(hook.features, logits)  # the attention MLP's nn.Linear is not mistaken for the head


# norms that cannot fill these models: BCN has no affine keyword; group norms need channel counts divisible by
# their group size, and the input norm has 3 channels (the class-map norms 10)
UNFIT = {"bcn": "does not accept it", "gn-cpg4": "not divisible", "gn-cpg8": "not divisible"}


@pytest.mark.slow
@pytest.mark.parametrize("norm", list_norms())
@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_every_norm_in_every_asc_model_trains_one_step(name, norm):
    def build():
        return create_model(name, num_classes=10, norm_layer=norm, widths=SMALL[name])

    if norm in UNFIT:
        with pytest.raises(ValueError, match=UNFIT[norm]):
            build()
        return
    torch.manual_seed(0)
    model = build().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 40)), torch.randint(0, 10, (4,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
