"""timm: BatchNormAct2d conversion and ``timm.create_model(name, norm_layer=...)`` for norm-act families.

Each converted model is matched against a float64 copy whose L2BN layers run the paper's formula written
out here (eval, then one training forward). Skipped without timm (the ``timm`` extra).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="needs the timm extra")

import l2bn  # noqa: E402
import l2bn.layers  # noqa: E402
from l2bn.norm_act import L2BatchNormAct2d  # noqa: E402
from timm.layers import BatchNormAct2d, get_norm_act_layer  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

F64 = torch.float64
FAST_MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002"]
SLOW_MODELS = ["cspresnet50", "rexnet_100"]
MODELS = FAST_MODELS + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW_MODELS]


def formula(input, running_mean, running_var, weight, bias, training, momentum, eps, *, rescale, l2_eps):
    """Eq. (3) then F.batch_norm in float64, independent of l2bn's kernels (same signature as the op)."""
    flat = input.reshape(input.shape[0], -1)
    scaled = F.normalize(flat, dim=1, eps=l2_eps) * (math.sqrt(flat.shape[1]) if rescale else 1.0)
    return F.batch_norm(scaled.view_as(input), running_mean, running_var, weight, bias, training, momentum, eps)


def plain_bn(model: nn.Module) -> list[str]:
    is_plain = lambda m: isinstance(m, _BatchNorm) and not isinstance(m, l2bn.layers._L2BatchNorm)  # noqa: E731
    return [name for name, m in model.named_modules() if is_plain(m)]


def check_against_formula(model: nn.Module, monkeypatch, size: int = 64) -> None:
    """Eval then one training forward (no dropout: models are built with drop_rate=0) against float64."""
    reference = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got_eval = model.eval()(x)
        got_train = model.train()(x)
        with monkeypatch.context() as patch:
            patch.setattr(l2bn.layers, "l2_batch_norm", formula)
            want_eval = reference.eval()(x.double())
            want_train = reference.train()(x.double())
    torch.testing.assert_close(got_eval.double(), want_eval, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_train.double(), want_train, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_convert_to_l2bn_converts_norm_act_layers_and_matches_formula(name, monkeypatch):
    model = timm.create_model(name, pretrained=False, num_classes=7, drop_rate=0.0)
    acts = [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left behind silently or with a warning
        l2bn.convert_to_l2bn(model)
    assert plain_bn(model) == []
    converted = [m for m in model.modules() if isinstance(m, L2BatchNormAct2d)]
    assert [type(m.act) for m in converted] == acts  # each layer keeps its own activation
    check_against_formula(model, monkeypatch)
    back = l2bn.convert_to_bn(copy.deepcopy(model))
    assert not any(isinstance(m, l2bn.layers._L2BatchNorm) for m in back.modules())
    assert [type(m.act) for m in back.modules() if isinstance(m, BatchNormAct2d)] == acts


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_002", pytest.param("cspresnet50", marks=pytest.mark.slow)])
def test_create_model_with_l2bn_norm_layer(name, monkeypatch):
    bn_model = timm.create_model(name, pretrained=False, num_classes=7, drop_rate=0.0)
    model = timm.create_model(name, pretrained=False, num_classes=7, drop_rate=0.0, norm_layer=l2bn.L2BatchNorm2d)
    assert plain_bn(model) == []
    bn_acts = [type(m.act) for m in bn_model.modules() if isinstance(m, BatchNormAct2d)]
    assert [type(m.act) for m in model.modules() if isinstance(m, L2BatchNormAct2d)] == bn_acts
    model.load_state_dict(bn_model.state_dict())  # timm BN checkpoints load strictly
    check_against_formula(model, monkeypatch)


def test_norm_act_factory_resolves_names_classes_and_partials():
    assert get_norm_act_layer("l2batchnorm").func is L2BatchNormAct2d
    assert get_norm_act_layer(L2BatchNormAct2d, act_layer=nn.SiLU).keywords == {"act_layer": nn.SiLU}
    layer = get_norm_act_layer(l2bn.L2BatchNorm2d, act_layer="silu")(8)
    assert isinstance(layer, L2BatchNormAct2d) and isinstance(layer.act, nn.SiLU)
    from functools import partial

    layer = get_norm_act_layer(partial(l2bn.L2BatchNorm2d, rescale=False), act_layer=nn.GELU)(8)
    assert layer.rescale is False and isinstance(layer.act, nn.GELU)


def test_norm_act_layer_is_l2bn_then_drop_then_act(monkeypatch):
    layer = L2BatchNormAct2d(4, act_layer=nn.ReLU, dtype=F64)
    with torch.no_grad():
        layer.bias.fill_(-0.3)
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    want = F.relu(formula(x, None, None, layer.weight, layer.bias, True, 0.1, 1e-5, rescale=True, l2_eps=1e-12))
    torch.testing.assert_close(layer(x), want)
    assert layer.num_batches_tracked.item() == 1


def test_timm_freeze_helper_mistreats_l2bn_as_readme_says():
    """README's "tools to avoid": freeze_batch_norm_2d skips L2BatchNorm2d and turns the norm-act layer into BN."""
    from timm.layers import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(nn.Sequential(l2bn.L2BatchNorm2d(3), L2BatchNormAct2d(3)))
    assert type(frozen[0]) is l2bn.L2BatchNorm2d and frozen[0].weight.requires_grad
    assert type(frozen[1]).__name__ == "FrozenBatchNormAct2d"


# --- tools that would undo L2BN --------------------------------------------------------------------------

def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_reparameterize_model_refuses_blocks_holding_l2bn_and_works_again_after_convert_to_bn(name):
    from timm.utils.model import reparameterize_model

    model = l2bn.convert_to_l2bn(timm.create_model(name, pretrained=False, num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    with pytest.raises(RuntimeError, match=r"reparameterize\(\) would fold its L2BN layers.*cannot be folded"):
        reparameterize_model(model)
    with pytest.raises(RuntimeError, match="cannot be folded"):
        reparameterize_model(model, inplace=True)
    torch.testing.assert_close(model(x), before)  # nothing was folded
    copy.deepcopy(model)  # the guard survives copies and pickling
    bn_model = l2bn.convert_to_bn(model)
    fused = reparameterize_model(bn_model)
    with torch.no_grad():
        assert _relative_error(fused(x), bn_model(x)) < 1e-4


@pytest.mark.parametrize("name", [
    "efficientformerv2_s0", "efficientvit_b0", "dpn48b", "dla34", "efficientvit_m0", "resnet18",
])
def test_create_timm_model_converts_what_norm_layer_misses_or_refuses(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model left with plain BatchNorm would warn
        model = l2bn.create_timm_model(name, pretrained=False, num_classes=4)
    assert l2bn.convert.unconverted_batchnorms(model) == []
    assert not any(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d, BatchNormAct2d) for m in model.modules())
    assert any(isinstance(m, l2bn.layers._L2BatchNorm) for m in model.modules())
    out = model(torch.randn(2, 3, 64, 64) if "efficientformer" not in name else torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_create_timm_model_warns_once_naming_layers_it_cannot_convert(monkeypatch):
    class OddNorm(nn.BatchNorm2d):
        pass

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: nn.Sequential(real(*a, **k), OddNorm(4)))
    with pytest.warns(UserWarning, match=r"create_timm_model\('resnet18'\) left 1 BatchNorm-like layer.*'1' \(OddNorm") as caught:
        l2bn.create_timm_model("resnet18", num_classes=4)
    assert len(caught) == 1
