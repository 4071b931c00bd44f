"""Every timm model with BatchNorm-family layers up to 50M parameters, converted to L2BN (tests/model_sweep.py
says what is checked). The full sweep is ``slow``; a few models run in the default suite."""
from __future__ import annotations

import functools

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs the timm extra")

from model_sweep import check_image_model, skip_unless_swept  # noqa: E402

FAST_SAMPLE = ["mobilenetv3_small_050", "regnetx_002", "repvgg_a0", "efficientvit_m0"]
SIZE = 64  # input side, unless the model needs another (_side)


def _build(name: str) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0)
    except TypeError as error:  # models without dropout (gemma4_vit_*_enc) refuse the keyword
        if "drop_rate" not in str(error):
            raise
        return timm.create_model(name, pretrained=False, num_classes=10)


def _side(model: torch.nn.Module) -> int:
    """SIZE, unless the model fixes its input size, sets a larger minimum (bat_resnext26ts, the halonets:
    their attention blocks tile the last feature map) or does not run at SIZE (inception_v3/v4: their stems
    leave a 2x2 map for a 3x3 kernel): then the size it was defined for."""
    config = getattr(model, "pretrained_cfg", None) or {}
    defined = config.get("input_size", (3, SIZE, SIZE))[-1]
    if config.get("fixed_input_size"):
        return defined
    side = max(SIZE, config.get("min_input_size", (SIZE,))[-1])
    return side if _runs_at(model, side) else defined


def _runs_at(model: torch.nn.Module, side: int) -> bool:
    """Whether the (unconverted) model's eval forward takes a batch of one ``side``×``side`` image."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, side, side))
    except RuntimeError:
        return False
    return True


def sweep(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_swept(functools.partial(_build, name))
    torch.manual_seed(0)
    model = _build(name)
    side = _side(model)
    check_image_model(model, side, monkeypatch)


@pytest.mark.parametrize("name", FAST_SAMPLE)
def test_timm_sample(name, monkeypatch):
    sweep(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", timm.list_models())
def test_timm_sweep(name, monkeypatch):
    sweep(name, monkeypatch)
